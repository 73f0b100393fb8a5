"""Config sections of the job's inputs: the images (``data``), the model, the EMBED pass."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.config.base import PathField, Strict, checking_paths, known_names


class ImageSetConfig(Strict):
    """One image set on disk, turned into manifest rows: an ImageFolder tree (``root/<class>/…``),
    a flat folder of OOD images, a list file (``<relative path> <label>`` lines, e.g. ImageNet
    ``val.txt``), or CIFAR's binary batches (``data_batch_*.bin`` / ``test_batch.bin``: raw
    bytes, no pickle)."""

    dataset: str
    split: Literal["train", "val", "test"]
    kind: Literal["imagefolder", "list", "cifar10-binary", "cifar100-binary", "npy"] = "imagefolder"
    #: a folder; for ``npy`` a ``.npy`` file of N×H×W×3 uint8 images (e.g. TinyImages-300K)
    root: PathField
    list_file: PathField | None = None
    ood: bool = False
    #: make a long-tailed train set (first n_k images per class, n_k = n_max·ρ^(−k/(C−1))) and a
    #: balanced ``val`` split from the remainder (``val_per_class`` images per class)
    imbalance_ratio: float | None = Field(default=None, gt=1)
    #: without ``imbalance_ratio``: hold out this many images per class of a train set as the ID
    #: ``val`` split (detectors fitted on held-out data: TempScale, KLM, Residual, VRA; thresholds)
    val_per_class: int | None = Field(default=None, ge=0)
    #: how many images the set has, for ``oodlib plan`` when the data is not at hand (e.g. ImageNet
    #: train 1281167); ignored by a run, which lists the set
    rows: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _paths_exist(self) -> "ImageSetConfig":
        if not checking_paths():
            return self
        if not self.root.exists():
            raise ValueError(f"root {self.root} does not exist (dataset {self.dataset!r})")
        if self.kind == "list" and (self.list_file is None or not self.list_file.is_file()):
            raise ValueError(f"list_file {self.list_file} does not exist (dataset {self.dataset!r})")
        return self


class DataConfig(Strict):
    """Which images: the embedded ``digits`` benchmark, a user manifest, or image sets on disk."""

    source: Literal["digits", "manifest", "folders"] = "digits"
    manifest: PathField | None = None
    sets: list[ImageSetConfig] = Field(default_factory=list)
    seed: int = 0
    id_dataset: str = "digits"
    ood_datasets: list[str] = Field(default_factory=lambda: ["digits-near", "photo-patches", "noise"])
    #: named groups of OOD sets, e.g. OpenOOD v1.5's ``{near: [ssb-hard, ninco], far: [...]}``: EVALUATE adds
    #: one row per group (dataset = the name, the unweighted mean over its sets) next to ``avg``;
    #: ERRORS counts the ``near`` sets as new-class failures (unless ``errors.new_class_datasets`` says otherwise)
    ood_groups: dict[str, list[str]] = Field(default_factory=dict)
    #: keep at most this many images per (dataset, split), every subset and class, evenly spaced — for quick runs and tests
    limit_per_split: int | None = Field(default=None, gt=0)
    #: extra datasets to embed and score without OOD evaluation (e.g. digits-c, LT train sets)
    extra_datasets: list[str] = Field(default_factory=list)
    #: incoming (production) datasets — e.g. tonight's images, a ``batch`` per night, labels
    #: optional: embedded, scored, risk-scored, flagged and tracked over batches; never fitted on
    incoming_datasets: list[str] = Field(default_factory=list)
    #: an image file (or embedded image) larger than this is quarantined before it is read whole
    max_image_bytes: int = Field(default=64 * 2**20, gt=0)

    @model_validator(mode="after")
    def _manifest_given(self) -> "DataConfig":
        if self.source == "manifest":
            if self.manifest is None:
                raise ValueError("data.manifest is required when data.source is 'manifest'")
            if checking_paths() and not self.manifest.exists():
                raise ValueError(f"data.manifest: file {self.manifest} does not exist")
        if self.source == "folders" and not self.sets:
            raise ValueError("data.sets must list the image sets when data.source is 'folders'")
        if not self.ood_datasets:
            raise ValueError("data.ood_datasets must name at least one OOD dataset")
        return self

    @model_validator(mode="after")
    def _roles_disjoint(self) -> "DataConfig":
        roles = {"id_dataset": [self.id_dataset], "ood_datasets": self.ood_datasets, "extra_datasets": self.extra_datasets,
                 "incoming_datasets": self.incoming_datasets}
        seen: dict[str, str] = {}
        for role, names in roles.items():
            for n in names:
                if n in seen and seen[n] != role:
                    raise ValueError(f"dataset {n!r} is in both data.{seen[n]} and data.{role}: a dataset has one role")
                seen[n] = role
        return self

    @model_validator(mode="after")
    def _groups_of_ood_sets(self) -> "DataConfig":
        import re

        for name, members in self.ood_groups.items():
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name == "avg" or name in self.ood_datasets:
                raise ValueError(f"data.ood_groups: group name {name!r} must be letters, digits, '_' or '-', "
                                 "and neither 'avg' nor an OOD set's name")
            unknown = [m for m in members if m not in self.ood_datasets]
            if unknown or not members or len(set(members)) != len(members):
                raise ValueError(f"data.ood_groups.{name}: {members} must list distinct sets of data.ood_datasets "
                                 f"{self.ood_datasets}" + (f" ({unknown} are not)" if unknown else ""))
        return self


class ModelConfig(Strict):
    """The classifier and how images become its input. Preprocessing starts from the model's own
    (digits-cnn: 32 px grey; densenet-bc-100: its CIFAR statistics; torchvision: ImageNet's 224 px
    crop of a 256 px resize), or a ``preset``, then any field given here replaces that part."""

    name: str = "digits-cnn"
    weights: str | None = None
    #: None: read from the weights file's head (torchvision, DenseNet), else 1000
    num_classes: int | None = Field(default=None, gt=1)
    device: str = "auto"
    preset: Literal["imagenet", "cifar", "digits", "densenet-bc"] | None = None
    #: the square input (crop) size in pixels
    input_size: int | None = Field(default=None, gt=0)
    #: shorter side after resizing, before the center crop to ``input_size``
    resize: int | None = Field(default=None, gt=0)
    #: False: resize straight to ``input_size`` (no crop)
    crop: bool | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    def preprocess(self, default):
        """The resolved :class:`~oodlib.data.preprocess.Preprocess` given the model's ``default``."""
        from oodlib.data.preprocess import resolve_preprocess

        return resolve_preprocess(default, self.preset, self.input_size, self.resize, self.crop, self.mean, self.std)

    @model_validator(mode="after")
    def _preprocess_consistent(self) -> "ModelConfig":
        from oodlib.data.preprocess import PRESETS, resolve_preprocess

        base = PRESETS[self.preset] if self.preset else (PRESETS["digits"] if self.name == "digits-cnn" else PRESETS["imagenet"])
        resolve_preprocess(base, None, self.input_size, self.resize, self.crop, self.mean, self.std)  # raises naming the problem
        return self

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from oodlib.models import MODELS

        return known_names([v], MODELS, "model")[0]

    @field_validator("device")
    @classmethod
    def _device_exists(cls, v: str) -> str:
        """``auto``, ``cpu``, ``cuda`` / ``cuda:N`` or ``mps`` — and a GPU device must exist here, or
        on the Ray cluster the job runs on (``$RAY_ADDRESS``)."""
        import os
        import re

        if v in ("auto", "cpu"):
            return v
        if not re.fullmatch(r"cuda(:\d+)?|mps", v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
        if os.environ.get("RAY_ADDRESS") or not checking_paths():
            return v  # the workers' devices are checked when the actors start (or only planning)
        import torch

        if v == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device 'mps' but this machine has no MPS device")
        if v.startswith("cuda"):
            index = int(v.split(":")[1]) if ":" in v else 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"device {v!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                                 "(and no RAY_ADDRESS cluster is set); use auto or cpu")
        return v

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: str | None) -> str | None:
        # a value with a path separator or a file suffix is a file; anything else a torchvision weights name
        if v is not None and ("/" in v or Path(v).suffix) and checking_paths() and not Path(v).exists():
            raise ValueError(f"weights file {v} does not exist")
        return v


class EmbedConfig(Strict):
    batch_size: int = Field(default=256, gt=0)
    #: actor pool size (max); min is 1
    num_actors: int = Field(default=1, gt=0)
    #: GPUs per actor: "auto" = 1 when the cluster has GPUs, else 0
    num_gpus_per_actor: Literal["auto"] | float = "auto"
    cpus_per_actor: float = Field(default=1.0, gt=0)
    #: the manifest is split into this many shards (sha1 of image_id); only new or changed shards
    #: are re-embedded on a later run. More shards = finer-grained recomputation, more files.
    num_shards: int = Field(default=32, gt=0, le=65536)
    #: shards embedded (and committed) per Ray Data pipeline; a crashed job resumes from the
    #: last committed wave
    shards_per_wave: int = Field(default=16, gt=0)
