"""Manifests: one Parquet row per image.

Columns: ``image_id`` (stable string, unique), ``dataset``, ``split`` (train/val/test),
``label`` (int32, −1 for OOD), ``subset`` (string, may be empty: e.g. a corruption name),
``batch`` (string, may be empty: e.g. the night an incoming image arrived, ``2026-12-01``),
and the image as either ``path`` (string, absolute or relative to the manifest's ``root``) or
``image`` (encoded bytes). Builders: from arrays (the embedded default), an ImageFolder tree,
a list file.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from oodlib.data.digits import ImageSet

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("label", pa.int32()),
        ("subset", pa.string()),
        ("batch", pa.string()),
        ("path", pa.string()),
        ("image", pa.binary()),
    ]
)
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, column or image id."""


def encode_png(image: np.ndarray) -> bytes:
    """uint8 H×W (grey) or H×W×3 (RGB) array → PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def manifest_from_image_sets(sets: Iterable[ImageSet]) -> pa.Table:
    """Manifest with PNG bytes from in-memory image sets."""
    cols: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    for s in sets:
        n = len(s.image_ids)
        cols["image_id"] += list(s.image_ids)
        cols["dataset"] += [s.dataset] * n
        cols["split"] += [s.split] * n
        cols["label"] += [int(v) for v in s.labels]
        cols["subset"] += list(s.subsets) if s.subsets else [""] * n
        cols["batch"] += list(s.batches) if s.batches else [""] * n
        cols["path"] += [None] * n
        cols["image"] += [encode_png(im) for im in s.images]
    return pa.Table.from_pydict(cols, schema=MANIFEST_SCHEMA)


def manifest_from_image_folder(
    root: str | Path, dataset: str, split: str, classes: Sequence[str] | None = None, ood: bool = False
) -> pa.Table:
    """Manifest of an ImageFolder tree ``root/<class>/<image>``.

    Labels are the index of the class folder in sorted order (or in ``classes`` when given, which
    must list every folder to keep); ``ood=True`` sets every label to −1 (and also accepts a flat
    folder of images). Paths are stored absolute; ids are ``dataset/split/<relative path>``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"image folder {root} does not exist or is not a directory")
    if split not in SPLITS:
        raise ManifestError(f"split {split!r} must be one of {SPLITS}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    class_names = list(classes) if classes is not None else folders
    rows = []
    if ood and not folders:
        rows = [(p, -1) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            raise ManifestError(f"class folder {folder} is missing")
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                rows.append((p, -1 if ood else label))
    if not rows:
        raise ManifestError(f"no images under {root}")
    return _path_table(rows, root, dataset, split)


def manifest_from_list_file(
    list_file: str | Path, root: str | Path | None, dataset: str, split: str
) -> pa.Table:
    """Manifest from a text file of ``<relative path> <label>`` lines (label −1 or absent = OOD).

    This is the format of the ImageNet/OOD benchmark lists (e.g. ``val.txt``); blank lines and
    lines starting with ``#`` are skipped.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise ManifestError(f"list file {list_file} does not exist")
    base = Path(root) if root is not None else list_file.parent
    rows = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and _is_int(parts[1]):
            rel, label = parts[0], int(parts[1])
        else:
            rel, label = line, -1
        rows.append((base / rel, label))
    if not rows:
        raise ManifestError(f"list file {list_file} names no images")
    return _path_table(rows, base, dataset, split)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _path_table(rows: list[tuple[Path, int]], root: Path, dataset: str, split: str) -> pa.Table:
    ids = [f"{dataset}/{split}/{p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()}" for p, _ in rows]
    n = len(rows)
    return pa.Table.from_pydict(
        {
            "image_id": ids,
            "dataset": [dataset] * n,
            "split": [split] * n,
            "label": [lab for _, lab in rows],
            "subset": [""] * n,
            "batch": [""] * n,
            "path": [str(p.resolve()) for p, _ in rows],
            "image": [None] * n,
        },
        schema=MANIFEST_SCHEMA,
    )


CIFAR_RECORD = {10: (1, 3072), 100: (2, 3072)}  # label bytes, pixel bytes per record


def manifest_from_cifar_binary(files: list[str | Path], dataset: str, split: str, num_classes: int = 10, ood: bool = False) -> pa.Table:
    """Manifest with PNG bytes from CIFAR's binary format (``data_batch_1.bin`` …, no pickle).

    CIFAR-10 records are 1 label byte + 3072 pixel bytes (R, G, B planes of 32×32); CIFAR-100
    records have a coarse and a fine label byte (the fine label is used). Ids are
    ``dataset/split/<file stem>-<record index>``.
    """
    if num_classes not in CIFAR_RECORD:
        raise ManifestError(f"CIFAR binary: num_classes must be 10 or 100, got {num_classes}")
    n_label, n_pixels = CIFAR_RECORD[num_classes]
    sets = []
    for f in map(Path, files):
        if not f.is_file():
            raise ManifestError(f"CIFAR binary file {f} does not exist")
        raw = np.frombuffer(f.read_bytes(), np.uint8)
        if raw.size % (n_label + n_pixels):
            raise ManifestError(f"{f}: size {raw.size} is not a multiple of the CIFAR-{num_classes} record size")
        records = raw.reshape(-1, n_label + n_pixels)
        labels = np.full(len(records), -1) if ood else records[:, n_label - 1].astype(int)
        images = records[:, n_label:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        ids = [f"{dataset}/{split}/{f.stem}-{i:05d}" for i in range(len(records))]
        sets.append(ImageSet(dataset, split, images, labels, ids))
    return manifest_from_image_sets(sets)


def manifest_from_npy(path: str | Path, dataset: str, split: str) -> pa.Table:
    """OOD manifest (label −1, PNG bytes) from a ``.npy`` array of N×H×W×3 uint8 images, e.g.
    TinyImages-300K (``300K_random_images.npy``); loaded with ``allow_pickle=False``."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"image array {path} does not exist")
    images = np.load(path, mmap_mode="r", allow_pickle=False)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ManifestError(f"{path}: expected N×H×W(×3) uint8 images, got {images.dtype} {images.shape}")
    ids = [f"{dataset}/{split}/{i:07d}" for i in range(len(images))]
    return manifest_from_image_sets([ImageSet(dataset, split, np.asarray(images), np.full(len(images), -1), ids)])


def concat_manifests(tables: Iterable[pa.Table]) -> pa.Table:
    """Concatenate manifests and validate the result."""
    table = pa.concat_tables([conform(t) for t in tables])
    validate_manifest(table)
    return table


def conform(table: pa.Table, source: str = "manifest") -> pa.Table:
    """Cast ``table`` to :data:`MANIFEST_SCHEMA`, adding optional missing columns as nulls."""
    required = ("image_id", "dataset", "split", "label")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ManifestError(f"{source}: missing required column(s) {missing}")
    if "path" not in table.column_names and "image" not in table.column_names:
        raise ManifestError(f"{source}: needs a 'path' or an 'image' column")
    n = table.num_rows
    arrays = []
    for f in MANIFEST_SCHEMA:
        if f.name in table.column_names:
            try:
                arrays.append(table.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ManifestError(f"{source}: column {f.name!r} cannot be read as {f.type}: {exc}") from exc
        elif f.name in ("subset", "batch"):
            arrays.append(pa.array([""] * n, pa.string()))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


def validate_manifest(table: pa.Table, source: str = "manifest") -> None:
    """Raise :class:`ManifestError` on duplicate or empty ids, bad splits, or rows without an image."""
    ids = table.column("image_id").to_pylist()
    if any(not i for i in ids):
        raise ManifestError(f"{source}: empty image_id")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise ManifestError(f"{source}: duplicate image_id {dup!r}")
    bad_split = set(table.column("split").to_pylist()) - set(SPLITS)
    if bad_split:
        raise ManifestError(f"{source}: split values {sorted(bad_split)} not in {SPLITS}")
    no_image = [
        i
        for i, p, b in zip(ids, table.column("path").to_pylist(), table.column("image").is_null().to_pylist())
        if p is None and b
    ]
    if no_image:
        raise ManifestError(f"{source}: image {no_image[0]!r} has neither a path nor image bytes")


def row_problems(table: pa.Table, num_classes: int | None = None, datasets: list[str] | None = None) -> list[str | None]:
    """Per row: why it cannot be used (the quarantine reason), or None.

    Problems: empty ``image_id``, a null or empty ``dataset`` (or, with ``datasets``, one not in
    that list), a repeated ``image_id`` (the first occurrence is kept), a split outside
    train/val/test, no path and no bytes, a label < −1 or ≥ ``num_classes``.
    """
    seen: set[str] = set()
    reasons: list[str | None] = []
    known = None if datasets is None else set(datasets)
    cols = zip(
        table.column("image_id").to_pylist(), table.column("dataset").to_pylist(), table.column("split").to_pylist(),
        table.column("label").to_pylist(), table.column("path").to_pylist(), table.column("image").is_null().to_pylist(),
    )
    for image_id, dataset, split, label, path, no_bytes in cols:
        reason = None
        if not image_id:
            reason = "empty image_id"
        elif not dataset:
            reason = "dataset is null or empty"
        elif known is not None and dataset not in known:
            reason = f"dataset {dataset!r} is not configured (this job's datasets: {', '.join(sorted(known))})"
        elif image_id in seen:
            reason = f"duplicate image_id {image_id!r} (first occurrence kept)"
        elif split not in SPLITS:
            reason = f"split {split!r} not in {SPLITS}"
        elif path is None and no_bytes:
            reason = "neither a path nor image bytes"
        elif label is None or label < -1 or (num_classes is not None and label >= num_classes):
            reason = f"label {label} out of range [-1, {num_classes})"
        seen.add(image_id)
        reasons.append(reason)
    return reasons


def _share(keys: np.ndarray, limit: int) -> list[tuple[np.ndarray, int]]:
    """(rows, quota) per distinct key in order of first appearance: ``limit`` shared out as evenly
    as the groups' sizes allow (a group smaller than its share gives the rest to the others)."""
    uniq, first = np.unique(keys, return_index=True)
    members = [np.flatnonzero(keys == k) for k in uniq[np.argsort(first)]]
    quota, left = np.zeros(len(members), int), min(limit, len(keys))
    while left:
        open_ = [g for g, rows in enumerate(members) if quota[g] < len(rows)]
        share, extra = divmod(left, len(open_))
        for i, g in enumerate(open_):
            take = min(share + (i < extra), len(members[g]) - quota[g])
            quota[g] += take
            left -= take
    return list(zip(members, quota.tolist()))


def spread_sample(labels: np.ndarray, limit: int, levels: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of at most ``limit`` rows, spread over the levels, the classes and the order.

    ``labels`` (N,): one class per row (−1 for OOD). ``levels`` (N,), optional: a second grouping
    shared out first (a corruption and severity of ``digits-c``), so every level keeps its share;
    within it the rows are shared out over the classes as evenly as their sizes allow, and each
    class's rows are taken evenly spaced in their order, class g offset by g/#classes of its
    stride (equal strides would pick the same positions of a periodic order in every class) —
    so every class is present whenever the quota ≥ #classes. (Evenly spaced rows of the whole set
    alias with a periodic class order: 20 of the digits' train split missed class 5.)
    """
    labels = np.asarray(labels)
    if levels is not None:
        parts = [rows[spread_sample(labels[rows], q)] for rows, q in _share(np.asarray(levels), limit)]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, int)
    groups = _share(labels, limit)
    picked = [rows[((np.arange(q) + g / len(groups)) * len(rows) / max(q, 1)).astype(int)]
              for g, (rows, q) in enumerate(groups)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, int)


def read_manifest(path: str | Path, strict: bool = True) -> pa.Table:
    """Read a manifest Parquet file; ``strict`` also rejects bad rows (see :func:`row_problems`)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        raw = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ManifestError(f"manifest {path} is not a readable Parquet file: {exc}") from exc
    table = conform(raw, source=str(path))
    if strict:
        validate_manifest(table, source=str(path))
    return table
