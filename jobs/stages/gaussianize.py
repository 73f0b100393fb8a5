"""GAUSSIANIZE (before EMBED): the backbone's BatchNorm statistics re-estimated on the long-tailed
ID training images (``bn.safetensors``); EMBED's ``gfeatures`` extra computes the Gaussianized
features in its single pass."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.config import JobConfig
from jobs.stages.base import Context, Stage, StageResult, labels_of, rows_hash, rows_of
from oodlib.data.decode import decode_batch
from oodlib.models import ModelAdapter


@dataclass
class GaussianizeResult(StageResult):
    model: ModelAdapter  # the Gaussianized copy of the job's model (eval mode)


class GaussianizeStage(Stage):
    name = "gaussianize"
    version = 1

    def enabled(self, cfg: JobConfig) -> bool:
        return cfg.graph.enabled

    def needs(self, cfg: JobConfig) -> tuple[str, ...]:
        return ("manifest",)

    def key(self, ctx: Context, up: dict) -> dict:
        g = ctx.cfg.graph
        self._rows = rows_of(up["manifest"].rows, g.train_dataset, "train")
        if self._rows.num_rows == 0:
            raise ValueError(f"graph.train_dataset: no train rows of {g.train_dataset!r} in the manifest")
        return {"model": ctx.model_hash, "train": rows_hash(self._rows), "epochs": g.bn_finetune_epochs, "seed": g.seed}

    def run(self, ctx: Context, up: dict, tmp: Path) -> None:
        g, rows = ctx.cfg.graph, self._rows
        x, reasons = decode_batch(rows.column("image").to_pylist(), rows.column("path").to_pylist(), ctx.model.preprocess,
                                  ctx.cfg.data.max_image_bytes)
        labels = labels_of(rows)[[r is None for r in reasons]]
        data = x if g.bn_finetune_epochs == 0 else [(x, labels)]
        from oodlib.longtail import gaussianize, save_bn_state  # torch-geometric: 1.5 s of import, only when used

        save_bn_state(gaussianize(ctx.model, data, epochs=g.bn_finetune_epochs, seed=g.seed, device="cpu"), tmp / "bn.safetensors")

    def load(self, ctx: Context, up: dict, path: Path) -> GaussianizeResult:
        from oodlib.longtail import load_bn_state

        return GaussianizeResult(path, load_bn_state(ctx.model, path / "bn.safetensors").eval())
