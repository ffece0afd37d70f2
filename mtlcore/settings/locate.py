"""Where data sets live: a parameter, else $MTLCORE_DATA_DIR, else a per-user cache folder."""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import sys
import threading
import zlib
from pathlib import Path

import numpy as np

ENV_VAR = "MTLCORE_DATA_DIR"


class DataNotFoundError(FileNotFoundError):
    """A data set's files are neither present nor downloadable; the message says how to get them."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mtlcore" / "data"


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: `explicit` if given, else $MTLCORE_DATA_DIR, else the per-user cache folder."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser().resolve()
    return default_cache_dir()


def find_files(root: Path, layouts: list[str], names: list[str]) -> Path | None:
    """The first folder `root/layout` that holds every file in `names` (gzipped or not)."""
    for layout in layouts:
        folder = root / layout
        if all(_existing(folder / name) is not None for name in names):
            return folder
    return None


def _existing(path: Path) -> Path | None:
    for candidate in (path, path.with_suffix("") if path.suffix == ".gz" else path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def missing_data_message(dataset: str, names: list[str], root: Path, layouts: list[str], how_to_get: str) -> str:
    folders = "\n".join(f"  - {root / layout}" for layout in layouts)
    files = ", ".join(names)
    return (
        f"{dataset} not found: need the files {files} in one of these folders:\n{folders}\n"
        f"(data root {root}, set by the `data_root` parameter or ${ENV_VAR}).\n"
        f"How to get them: {how_to_get}"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not, as a numpy array."""
    return read_idx_and_md5(path)[0]


def read_idx_and_md5(path: Path) -> tuple[np.ndarray, str]:
    """`read_idx`, and the MD5 of the decompressed bytes: data manifests list it, and it is the same for the
    .gz and the raw file."""
    path = _existing(path) or path
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, zlib.error, OSError) as error:  # a gzip stream cut short, or not gzip at all
        raise ValueError(f"{path} could not be read ({error}): a truncated or corrupt download? "
                         "Delete it and fetch it again (`mtlcore data <setting>`)") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim, body = data[3], 4 + 4 * data[3]
    itemsize = np.dtype(dtypes[data[2]]).itemsize
    if len(data) < body or (len(data) - body) % itemsize:
        raise ValueError(f"{path}: {len(data)} bytes do not hold a {ndim}-dimensional header and whole "
                         f"{itemsize}-byte elements (truncated file?)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=dtypes[data[2]], offset=body)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} elements (truncated file?)")
    return array.reshape(shape), hashlib.md5(data).hexdigest()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` (uint8) as a gzipped IDX file, exactly the released MNIST format (used by tests)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


# -- which files a run read, and whether they changed since ---------------------------------------------------------
_LOCAL = threading.local()  # each thread's open `recording_reads`: (root, files read under it)
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, for this process


def _recorders() -> list:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not getattr(_LOCAL, "stack", None):
        return
    path, mode, flags = args
    if not isinstance(path, (str, os.PathLike)):  # a file descriptor
        return
    if isinstance(mode, str) and any(c in mode for c in "wax+") or mode is None and flags & (os.O_WRONLY | os.O_RDWR):
        return
    _note(os.path.abspath(path))


def _note(path: str) -> None:
    for root, files in _recorders():
        if root is None:
            files.add(path)
            continue
        try:
            files.add(Path(path).relative_to(root).as_posix())
        except ValueError:  # outside this root
            pass


class recording_reads:
    """`with recording_reads(root) as files:` collects the files under `root` that this thread opens for reading
    meanwhile (paths relative to `root`; absolute paths for `root=None`), e.g. while a setting loads its data. Data
    readers cached with `cached_reads` report the files behind a cached result again. Other threads' reads (a claim's
    heartbeat, a Dask worker's other tasks) are not counted."""

    _installed = False
    _lock = threading.Lock()

    def __init__(self, root: str | os.PathLike | None):
        self.entry = (None if root is None else Path(os.path.abspath(root)), set())

    def __enter__(self) -> set[str]:
        with recording_reads._lock:
            if not recording_reads._installed:
                sys.addaudithook(_audit)  # permanent, and a no-op while nothing records
                recording_reads._installed = True
        _recorders().append(self.entry)
        return self.entry[1]

    def __exit__(self, *exc) -> None:
        stack = _recorders()
        for i in range(len(stack) - 1, -1, -1):  # this entry itself, not an equal one
            if stack[i] is self.entry:
                del stack[i]
                break


def cached_reads(maxsize: int):
    """`functools.lru_cache` for a data reader that also tells `recording_reads` which files a cached result came
    from (a cache hit opens none), and reads again when one of those files changed (size or modification time)."""
    def decorate(func):
        @functools.lru_cache(maxsize=maxsize)
        def read(*args, **kwargs):
            with recording_reads(None) as files:
                result = func(*args, **kwargs)
            return result, {path: _stamp(path) for path in files}

        @functools.wraps(func)
        def reader(*args, **kwargs):
            result, files = read(*args, **kwargs)
            if any(_stamp(path) != stamp for path, stamp in files.items()):
                read.cache_clear()
                result, files = read(*args, **kwargs)
            if getattr(_LOCAL, "stack", None):
                for path in files:
                    _note(path)
            return result

        reader.cache_clear, reader.cache_info = read.cache_clear, read.cache_info
        return reader
    return decorate


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes (first 16 hex digits), computed once per (path, size, mtime) in a process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()[:16]
    return _DIGESTS[key]


def digests(root: Path, files) -> dict[str, str]:
    """relative name -> digest of `files` under `root` (the ones that are still there)."""
    return {name: file_digest(root / name) for name in sorted(files) if (root / name).is_file()}


def changed_files(root: Path, recorded: dict[str, str]) -> list[str]:
    """The recorded files under `root` whose digest differs now (files that are absent are not counted: data moved
    away, say on a machine that only renders results, cannot be checked)."""
    return [name for name, digest in recorded.items() if (root / name).is_file() and file_digest(root / name) != digest]
