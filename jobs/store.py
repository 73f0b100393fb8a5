"""Where outputs live: a local directory, or an object store (``s3://``, ``gs://``) read and written
through pyarrow filesystems (what Ray Data uses too).

Every output file has a **local path**, and the stage code only ever sees local paths. For a
local output that path *is* the output. For an object-store output it is the file's place in the
node-local **mirror**, ``$OODLIB_CACHE_DIR`` (default ``~/.cache/oodlib``) ``/<scheme>/<bucket>/<key>``:
the path alone says which object it stands for, so the driver and every worker on every node map
it the same way with nothing shipped besides the path. The store is the truth; the mirror is a
read-through copy that is only ever filled with committed (immutable, verified) directories or
with what this node itself committed — see :mod:`jobs.storage` for the commit protocol.

The functions here take local paths and act on the store behind them (for a local output: on the
path itself, through ``pyarrow.fs.LocalFileSystem`` — one implementation for both):
:func:`listing`, :func:`read_bytes`, :func:`write_text`, :func:`delete`, :func:`upload`,
:func:`download`; :func:`uri` names a path for people, run records and Delta Lake.

Work handed from the workers to the driver goes the same way: a worker writes into a scratch
directory of the mirror (``{experiment}/.scratch/<run>/…``) on its node and uploads it (Ray Data's
EMBED write tasks write through the store's filesystem directly), and the driver completes its own
copy with :func:`pull` before it commits.

Endpoint and credentials come from the standard variables, read by pyarrow and by delta-rs alike:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION`` (``AWS_ALLOW_HTTP=true`` for a plain-http endpoint such as a local MinIO), and
``GOOGLE_APPLICATION_CREDENTIALS`` for GCS (``STORAGE_EMULATOR_HOST``, e.g. ``http://127.0.0.1:4443``,
points the GCS filesystem at an emulator, anonymously — what Google's client libraries honour too).
"""
from __future__ import annotations

import functools
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pyarrow.fs as pafs

CACHE_ENV = "OODLIB_CACHE_DIR"
SCHEMES = ("s3", "gs")
#: the variables an object-store job needs on every node (``oodlib submit`` passes those that are set)
STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP", "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST",
             CACHE_ENV)
#: parallel transfers of one directory
TRANSFERS = 8


def cache_root() -> Path:
    """The node-local mirror of every object store (``$OODLIB_CACHE_DIR``, default ``~/.cache/oodlib``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "oodlib").resolve()


def is_uri(output: str | Path) -> bool:
    return isinstance(output, str) and "://" in output


def root_path(output: str | Path) -> Path:
    """The local path of an output: the directory itself, or the mirror of ``scheme://bucket/prefix``."""
    if not is_uri(output):
        return Path(output)
    scheme, _, rest = output.partition("://")
    return cache_root() / scheme / rest.strip("/")


def _remote(path: Path) -> tuple[str, str] | None:
    """(scheme, ``bucket/key``) of a mirror path; None for a plain local path."""
    try:
        rel = Path(path).resolve().relative_to(cache_root())
    except ValueError:
        return None
    if len(rel.parts) < 2 or rel.parts[0] not in SCHEMES:
        return None
    return rel.parts[0], Path(*rel.parts[1:]).as_posix()


def is_remote(path: Path) -> bool:
    """Whether ``path`` stands for an object in a store (is in the mirror)."""
    return _remote(path) is not None


def uri(path: Path) -> str:
    """How to name ``path`` outside this node: ``s3://bucket/key`` for a mirror path, else the path."""
    where = _remote(path)
    return str(path) if where is None else f"{where[0]}://{where[1]}"


def local_path(name: str | Path) -> Path:
    """The local path of a name :func:`uri` gave (a URI, or a local path as it is)."""
    return root_path(str(name)) if is_uri(str(name)) else Path(name)


def filesystem(scheme: str) -> pafs.FileSystem:
    """The pyarrow filesystem of a scheme (``file``, ``s3``, ``gs``), configured from the environment
    (the endpoint: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST`` for
    GCS; pyarrow's own lookup covers the credentials and the region)."""
    endpoint = {"s3": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
                "gs": os.environ.get("STORAGE_EMULATOR_HOST")}.get(scheme)
    return _filesystem(scheme, endpoint)


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, endpoint: str | None) -> pafs.FileSystem:
    """Bounded timeouts and retries: an unreachable endpoint fails in seconds, not minutes."""
    if scheme == "s3":
        return pafs.S3FileSystem(endpoint_override=endpoint, connect_timeout=5, request_timeout=60,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
    if scheme == "gs":
        if endpoint:  # an emulator: "http://host:port" (or "host:port", plain http)
            protocol, _, host = endpoint.rpartition("://")
            return pafs.GcsFileSystem(anonymous=True, scheme=protocol or "http", endpoint_override=host,
                                      retry_time_limit=timedelta(seconds=60))
        return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=60))
    return pafs.LocalFileSystem()


def fs_of(path: Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of the store behind a local path."""
    where = _remote(path)
    if where is None:
        return filesystem("file"), str(Path(path).absolute())
    return filesystem(where[0]), where[1]


# --- reading and writing the store behind a local path ---


def listing(path: Path) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``path`` in the store ({} when there is none)."""
    fs, where = fs_of(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(where, recursive=True, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {i.path[len(where):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def read_bytes(path: Path) -> bytes:
    """The bytes of a file in the store (FileNotFoundError when absent)."""
    fs, where = fs_of(path)
    with fs.open_input_stream(where) as f:
        return f.read()


def write_text(path: Path, text: str) -> None:
    """Write a small file at ``path`` and into the store (a local file is replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    upload(path.parent, [path.name])


def delete(path: Path) -> None:
    """Delete a file or a directory tree from the store and from the mirror."""
    where = _remote(path)
    if where is not None:
        fs, key = fs_of(path)
        kind = fs.get_file_info(key).type
        if kind == pafs.FileType.File:
            fs.delete_file(key)
        elif kind == pafs.FileType.Directory:
            fs.delete_dir_contents(key, missing_dir_ok=True)
            if fs.get_file_info(key).type == pafs.FileType.Directory:  # a marker object of its own (GCS, S3: not always)
                fs.delete_dir(key)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def upload(local_dir: Path, files: list[str], dest: Path | None = None) -> None:
    """Copy ``files`` (relative to ``local_dir``) to the store behind ``dest`` (default
    ``local_dir``), in parallel, in no particular order. A no-op for a local destination."""
    dest = local_dir if dest is None else dest
    if not is_remote(dest):
        return
    fs, where = fs_of(dest)

    def put(rel: str) -> None:
        with open(local_dir / rel, "rb") as src, fs.open_output_stream(f"{where}/{rel}") as out:
            shutil.copyfileobj(src, out, 1 << 22)

    _each(put, files)


def download(path: Path, files: list[str], into: Path) -> None:
    """Copy ``files`` (relative to ``path``) from the store behind ``path`` into the local ``into``."""
    fs, where = fs_of(path)

    def get(rel: str) -> None:
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{where}/{rel}") as src, open(into / rel, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)

    _each(get, files)


def pull(path: Path) -> None:
    """Make a scratch directory that workers on other nodes wrote (and uploaded) complete here:
    download the files of the store behind ``path`` that are not here with their size. A no-op for
    a local output (every worker wrote ``path`` itself)."""
    if not is_remote(path):
        return
    files = [rel for rel, size in listing(path).items() if not ((path / rel).is_file() and (path / rel).stat().st_size == size)]
    download(path, files, path)


def _each(fn, items: list) -> None:
    if len(items) <= 1:
        for i in items:
            fn(i)
        return
    with ThreadPoolExecutor(min(TRANSFERS, len(items))) as pool:
        list(pool.map(fn, items))


def check_writable(output: str) -> None:
    """Write and delete a small probe object under an object-store ``output``; ValueError naming the
    reason when the bucket cannot be reached or written (checked before any Ray resource is used)."""
    probe = root_path(output) / f".oodlib-probe-{uuid.uuid4().hex[:12]}"
    fs, where = fs_of(probe)
    try:
        with fs.open_output_stream(where) as out:
            out.write(b"probe")
        fs.delete_file(where)
    except Exception as exc:  # OSError from pyarrow: unreachable endpoint, no such bucket, access denied …
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{output} is not writable ({first}); check the bucket and AWS_ENDPOINT_URL / credentials "
                         "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) or GOOGLE_APPLICATION_CREDENTIALS") from None
