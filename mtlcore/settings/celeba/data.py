"""CelebA's data (paper A, Appendix A): 40 binary face attributes, all read from the same aligned image.

The release, as torchvision's `CelebA(root)` keeps it under `root/celeba/` (or directly in the data root):
- `img_align_celeba/*.jpg`: 202,599 aligned 178×218 JPEGs;
- `list_attr_celeba.txt`: the number of images, the 40 attribute names, then one line per image: its file name and
  40 values, 1 (present) or -1 (absent), separated by one or more spaces;
- `list_eval_partition.txt`: one line per image: its file name and 0, 1 or 2 (train, valid, test).

Splits are the official partition (162,770 / 19,867 / 19,962 images); `train_size`, `val_size`, `test_size` below a
partition's size take a seeded subset of it (the first `size` of a permutation drawn from `data_seed` and the split:
a smaller cap keeps a subset of a larger one's images). Targets are 0/1 per attribute.

Images: the central 178×178 square of each aligned image (rows 20–197, the face; the aligned faces are centred)
resized to `image_size`² by PIL's bilinear filter (antialiased when shrinking), decoded once into a uint8 cache next
to the data (`.mtlcore_cache/`, or under the user cache when the data folder is not writable) and memory-mapped
afterwards. A load decodes only the images its splits select; the cache is keyed by the image size, the MD5s of the
two list files and the list of images it holds, and a cache of more images (e.g. of the whole release) serves any
subset of them. The inputs stay uint8: `{"images": N×3×S×S uint8, "normalization": N×2×3 float64}`, the second a
zero-stride view of one (mean, std) pair per channel of the training images (on the [0, 1] scale, float64, from the
pixel histogram: independent of thread counts). The model's first layer normalises (`model.Normalize`): the
trainer builds models without the data, so the statistics travel with the inputs. uint8 keeps the paper's 202,599
images at 64×64 in 2.5 GB (float32 would take 10 GB).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torch
from tqdm import tqdm

from mtlcore._seeding import numpy_rng
from mtlcore.settings.base import SPLITS, Examples, SettingData, single_input_data
from mtlcore.settings.locate import cached_reads, DataNotFoundError, data_root, default_cache_dir, missing_data_message

log = logging.getLogger(__name__)

# The 40 attributes in the order of list_attr_celeba.txt's header.
TASKS = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes",
    "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling",
    "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)
# The official partition's sizes: the default caps (a cap equal to the partition takes all of it).
PARTITION_SIZES = {"train": 162_770, "val": 19_867, "test": 19_962}
PARTITION_NAMES = {"train": "train (0)", "val": "valid (1)", "test": "test (2)"}

IMAGE_FOLDER = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
LAYOUTS = ["celeba", "."]  # torchvision's root/celeba/, or the data root itself
# torchvision's MD5s of the released files: another file is warned about (its splits are not the paper's).
RELEASE_MD5 = {ATTR_FILE: "75e246fa4810816ffd6ee81facbd244c", PARTITION_FILE: "d32c9cbf5e040fd4025c592c306e6668"}
OFFICIAL_SITE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"

CACHE_FOLDER = ".mtlcore_cache"
# Bump when the decoding (crop, resize, layout) changes: old caches are then left alone and a new one is built.
CACHE_FORMAT = 1
PREPROCESSING = "central square crop (178×178 of the aligned 178×218), PIL bilinear resize to image_size², uint8 RGB"
DECODE_CHUNK = 1024  # images handed to the decoding threads at a time (the progress bar moves per chunk)


# -- finding the files ---------------------------------------------------------------------------------------------
def _complete(folder: Path) -> bool:
    return (folder / ATTR_FILE).is_file() and (folder / PARTITION_FILE).is_file() and (folder / IMAGE_FOLDER).is_dir()


def _how_to_get(root: Path) -> str:
    return (f"torchvision's `CelebA({str(root)!r}, download=True)` (needs the `gdown` package) downloads them from "
            "Google Drive into the `celeba/` folder, but Google Drive often refuses with a quota error; otherwise "
            f"download them from the official site {OFFICIAL_SITE} (Align&Cropped Images: img_align_celeba.zip, "
            f"and from Anno/ and Eval/ the files {ATTR_FILE} and {PARTITION_FILE}) into {root / 'celeba'}, and unzip "
            f"img_align_celeba.zip there (it holds the {IMAGE_FOLDER}/ folder).")


def celeba_folder(root: Path, download: bool = True) -> Path:
    """The folder under `root` that holds the release (see the module docstring); DataNotFoundError otherwise."""
    folder = next((root / layout for layout in LAYOUTS if _complete(root / layout)), None)
    if folder is None and download:
        try:
            import torchvision

            log.info("CelebA not found under %s; trying torchvision's download (1.4 GB from Google Drive)", root)
            torchvision.datasets.CelebA(str(root), split="all", target_type="attr", download=True)
        except Exception as error:  # offline, no gdown, Drive quota: report below with the full instructions
            log.warning("CelebA download failed: %s", error)
        folder = next((root / layout for layout in LAYOUTS if _complete(root / layout)), None)
    if folder is None:
        names = [f"{IMAGE_FOLDER}/ (the aligned JPEGs)", ATTR_FILE, PARTITION_FILE]
        message = missing_data_message("CelebA", names, root, LAYOUTS, _how_to_get(root))
        archives = [root / layout / f"{IMAGE_FOLDER}.zip" for layout in LAYOUTS]
        zipped = [a for a in archives if a.is_file() and not (a.parent / IMAGE_FOLDER).is_dir()]
        if zipped:
            message += f"\nFound {zipped[0]} but no {IMAGE_FOLDER}/ folder beside it: unzip it there."
        raise DataNotFoundError(message)
    return folder.resolve()


# -- the list files ------------------------------------------------------------------------------------------------
def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _int(text: str, path: Path, line: int) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}, line {line}: expected an integer, found {text!r}") from None


def _read_attributes(path: Path) -> tuple[list[str], np.ndarray]:
    """File names and their N×40 int8 attribute values (1 / -1), checked against the header and the count line."""
    lines = path.read_text().replace("\t", " ").splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path} holds {len(lines)} line(s); the release starts with a count line and the 40 "
                         "attribute names (a truncated file?)")
    count = _int(lines[0].strip(), path, 1)
    header = tuple(lines[1].split())
    if header != TASKS:
        differ = [f"{i + 1}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(header, TASKS)) if a != b][:5]
        raise ValueError(f"{path}: the header (line 2) names {len(header)} attributes that are not the release's 40 "
                         f"in its order (first differences, position: file vs expected: {differ}); expected "
                         f"{list(TASKS)}. Is this CelebA's list_attr_celeba.txt?")
    rows = [line.strip() for line in lines[2:] if line.strip()]
    if len(rows) != count:
        raise ValueError(f"{path}: line 1 says {count} images but {len(rows)} image lines follow (a truncated file?)")
    names, signs = [], []  # each row's values without the spaces ("-11-1..."): parsed at once below
    for number, row in enumerate(rows, start=3):
        name, _, values = row.partition(" ")
        compact = values.replace(" ", "")
        if compact.count("1") != len(TASKS):
            raise ValueError(f"{path}, line {number}: expected a file name and {len(TASKS)} values 1 or -1, found "
                             f"{row[:60]!r}...")
        names.append(name)
        signs.append(compact)
    text = np.frombuffer("".join(signs).encode("ascii", errors="replace"), dtype=np.uint8)
    ones = np.flatnonzero(text == ord("1"))  # one "1" per value, after a "-" for -1
    minus = np.flatnonzero(text == ord("-"))
    if len(ones) + len(minus) != len(text) or (text[np.minimum(minus + 1, len(text) - 1)] != ord("1")).any():
        raise ValueError(f"{path}: attribute values must be 1 or -1 (found other characters, or a '-' alone)")
    negative = (ones > 0) & (text[np.maximum(ones - 1, 0)] == ord("-"))
    values = np.where(negative, -1, 1).astype(np.int8).reshape(len(rows), len(TASKS))
    return names, values


def _read_partition(path: Path) -> tuple[list[str], np.ndarray]:
    names, codes = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}, line {number}: expected a file name and 0, 1 or 2 (train, valid, test), "
                             f"found {line.strip()!r}")
        names.append(fields[0])
        codes.append(int(fields[1]))
    return names, np.array(codes, dtype=np.int8)


@cached_reads(maxsize=4)
def _lists(folder: Path, signature: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str]]:
    """The partition file's image names (in its order), their partition codes, their 0/1 attributes (N×40, in the
    partition's order) and the two files' MD5s. Cached per process; `signature` (sizes, mtimes) renews it."""
    attr_names, values = _read_attributes(folder / ATTR_FILE)
    names, codes = _read_partition(folder / PARTITION_FILE)
    if names != attr_names:
        row_of = {name: i for i, name in enumerate(attr_names)}
        missing = [name for name in names if name not in row_of]
        if missing:
            raise ValueError(f"{len(missing)} image(s) of {folder / PARTITION_FILE} have no line in "
                             f"{folder / ATTR_FILE} (e.g. {missing[:3]}): the two files are from different releases?")
        values = values[[row_of[name] for name in names]]
    md5 = {name: _md5(folder / name) for name in (ATTR_FILE, PARTITION_FILE)}
    for name, found in md5.items():
        if found != RELEASE_MD5[name]:
            log.warning("%s is not CelebA's released file (MD5 %s, the release's %s): its splits and results are not "
                        "comparable with the paper's", folder / name, found, RELEASE_MD5[name])
    attributes = (values == 1).astype(np.int64)
    array = np.array(names)
    for a in (array, codes, attributes):
        a.setflags(write=False)  # shared by every later load in the process
    return array, codes, attributes, md5


def read_lists(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str]]:
    """`_lists` of `folder`, re-read when either file changed."""
    stats = [(folder / name).stat() for name in (ATTR_FILE, PARTITION_FILE)]
    return _lists(folder, tuple((s.st_size, s.st_mtime_ns) for s in stats))


def select(codes: np.ndarray, sizes: dict[str, int], data_seed: int, where: Path | str) -> dict[str, np.ndarray]:
    """Each split's rows (ascending) of the partition: all of it, or a seeded subset of `sizes[split]` rows."""
    rows = {}
    for code, split in enumerate(SPLITS):
        partition = np.flatnonzero(codes == code)
        size = sizes[split]
        if size > len(partition):
            raise ValueError(f"{split}_size={size} but CelebA's official {PARTITION_NAMES[split]} partition holds "
                             f"{len(partition)} images ({where}); set {split}_size <= {len(partition)}")
        if size < len(partition):
            partition = np.sort(partition[numpy_rng(data_seed, "celeba", split).permutation(len(partition))[:size]])
        rows[split] = partition
    return rows


# -- decoding and the cache ----------------------------------------------------------------------------------------
def decode_image(path: Path, image_size: int) -> np.ndarray:
    """One aligned JPEG as 3×S×S uint8: its central square, resized bilinearly (antialiased when shrinking)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR,
                                 box=(left, top, left + side, top + side))
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, SyntaxError, ValueError) as error:  # PIL: truncated data, not an image, a bad header
        raise ValueError(f"{path} could not be decoded ({type(error).__name__}: {error}): a truncated or corrupt "
                         f"file? Replace it from the release ({OFFICIAL_SITE}).") from error


def _user_cache(folder: Path) -> Path:
    """The fallback cache folder of a data folder that cannot be written to: one per data folder."""
    tag = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    return default_cache_dir().parent / "celeba_images" / tag


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _cache_key(image_size: int, md5: dict[str, str], names: np.ndarray) -> str:
    listed = hashlib.sha256("\n".join(names.tolist()).encode()).hexdigest()
    text = json.dumps({"format": CACHE_FORMAT, "image_size": image_size, "lists_md5": md5, "images": listed},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_index(index_path: Path, image_size: int, md5: dict[str, str]) -> list[str] | None:
    """The image names a complete cache holds, or None: an unreadable or foreign index, or a data file whose size
    is not the index's (a killed or truncated write) is never used."""
    try:
        index = json.loads(index_path.read_text())
        if (index.get("format") != CACHE_FORMAT or index.get("image_size") != image_size
                or index.get("lists_md5") != md5):
            return None
        files = index["files"]
        expected = len(files) * 3 * image_size * image_size
        if index_path.with_suffix(".u8").stat().st_size != expected:
            log.warning("ignoring the CelebA image cache %s: %d bytes instead of %d (an interrupted write?)",
                        index_path.with_suffix(".u8"), index_path.with_suffix(".u8").stat().st_size, expected)
            return None
        return files
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _find_cache(folders: list[Path], key: str, image_size: int, md5: dict[str, str], needed: np.ndarray
                ) -> tuple[Path, list[str]] | None:
    """A complete cache of this image size and these list files that holds every needed image: the one made for
    exactly these images first, else any larger one (e.g. of the whole release)."""
    for folder in folders:
        index = folder / f"images_{image_size}_{key}.json"
        files = _read_index(index, image_size, md5) if index.is_file() else None
        if files is not None and files == needed.tolist():
            return index.with_suffix(".u8"), files
    wanted = set(needed.tolist())
    for folder in folders:
        for index in sorted(folder.glob(f"images_{image_size}_*.json")) if folder.is_dir() else []:
            if index.name == f"images_{image_size}_{key}.json":
                continue
            files = _read_index(index, image_size, md5)
            if files is not None and len(files) > len(wanted) and wanted <= set(files):
                return index.with_suffix(".u8"), files
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _build_cache(folder: Path, cache_folder: Path, key: str, image_size: int, md5: dict[str, str],
                 names: np.ndarray) -> Path:
    """Decode `names` into `images_{S}_{key}.u8` (N×3×S×S uint8) and its index `.json`. The data goes to a temporary
    file renamed into place, then the index: a killed decode leaves no cache that reads as complete."""
    paths = [folder / IMAGE_FOLDER / name for name in names.tolist()]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataNotFoundError(f"{len(missing)} JPEG(s) listed in {folder / PARTITION_FILE} are missing from "
                                f"{folder / IMAGE_FOLDER} (e.g. {missing[:5]}): an incompletely extracted "
                                f"img_align_celeba.zip? Extract it again, or download it from {OFFICIAL_SITE}")
    cache_folder.mkdir(parents=True, exist_ok=True)
    target = cache_folder / f"images_{image_size}_{key}.u8"
    tmp = cache_folder / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    shape = (len(paths), 3, image_size, image_size)
    workers = max(1, min(8, os.cpu_count() or 1))  # PIL releases the GIL while decoding and resizing
    try:
        images = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
        description = f"CelebA: decoding JPEGs to {image_size}×{image_size}"
        with ThreadPoolExecutor(workers) as pool, tqdm(total=len(paths), desc=description, unit="img",
                                                        mininterval=2) as bar:
            for start in range(0, len(paths), DECODE_CHUNK):
                chunk = paths[start : start + DECODE_CHUNK]
                for offset, image in enumerate(pool.map(lambda p: decode_image(p, image_size), chunk)):
                    images[start + offset] = image
                bar.update(len(chunk))
        images.flush()
        del images
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    index = {"format": CACHE_FORMAT, "image_size": image_size, "shape": list(shape), "dtype": "uint8",
             "preprocessing": PREPROCESSING, "decoder": f"Pillow {PIL.__version__}", "lists_md5": md5,
             "source": str(folder / IMAGE_FOLDER),
             "files": names.tolist()}
    _atomic_write_text(target.with_suffix(".json"), json.dumps(index))
    log.info("CelebA: cached %d decoded images at %s", len(paths), target)
    return target


def image_cache(folder: Path, names: np.ndarray, image_size: int, md5: dict[str, str]
                ) -> tuple[np.ndarray, list[str], Path]:
    """The decoded images of `names` (memory-mapped, copy-on-write: the file is never changed), the names of the
    cache's rows (a superset of `names`, in the partition's order) and the cache file; built on first use."""
    key = _cache_key(image_size, md5, names)
    preferred, fallback = folder / CACHE_FOLDER, _user_cache(folder)
    found = _find_cache([preferred, fallback], key, image_size, md5, names)
    if found is None:
        cache_folder = preferred
        if not _writable(preferred):
            cache_folder = fallback
            log.warning("CelebA: %s is not writable; caching the decoded images under %s instead", preferred, fallback)
        _build_cache(folder, cache_folder, key, image_size, md5, names)
        found = _find_cache([cache_folder], key, image_size, md5, names)
        if found is None:  # another process replaced it with a different file in between: never silently
            raise RuntimeError(f"the CelebA image cache just written to {cache_folder} does not read back as complete")
    path, files = found
    images = np.memmap(path, dtype=np.uint8, mode="c", shape=(len(files), 3, image_size, image_size))
    return images, files, path


def _rows(images: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    """The cache's rows at `positions` (ascending): a view of the memory map when they are one contiguous run (the
    full partition), else a copy."""
    if len(positions) and positions[-1] - positions[0] + 1 == len(positions):
        return torch.from_numpy(images[positions[0] : positions[-1] + 1])
    return torch.from_numpy(np.ascontiguousarray(images[positions]))


def channel_statistics(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std (divides by N) of uint8 N×3×S×S images on the [0, 1] scale, in float64
    from the pixel histogram: exact counts, so the same numbers on every machine and thread count."""
    counts = np.zeros((images.shape[1], 256), dtype=np.float64)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096]
        for channel in range(images.shape[1]):
            counts[channel] += torch.bincount(chunk[:, channel].reshape(-1), minlength=256).double().numpy()
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1)
    mean = (counts * values).sum(axis=1) / total
    std = np.sqrt((counts * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / total)
    return mean, np.maximum(std, 1e-6)


def missing_images(root: Path) -> list[str]:
    """The JPEGs listed in the partition file that are not in the image folder (checked by `mtlcore data`)."""
    folder = celeba_folder(root, download=False)
    names, _, _, _ = read_lists(folder)
    return [name for name in names.tolist() if not (folder / IMAGE_FOLDER / name).is_file()]


# -- loading -------------------------------------------------------------------------------------------------------
def load(tasks: list[str], train_size: int = PARTITION_SIZES["train"], val_size: int = PARTITION_SIZES["val"],
         test_size: int = PARTITION_SIZES["test"], image_size: int = 64, data_seed: int = 0,
         root: str | Path | None = None, download: bool = True) -> SettingData:
    """The CelebA attributes in `tasks` (checked by the setting) on the official partition, capped at the `*_size`s."""
    root = data_root(root)
    folder = celeba_folder(root, download)
    names, codes, attributes, md5 = read_lists(folder)
    sizes = {"train": train_size, "val": val_size, "test": test_size}
    rows = select(codes, sizes, data_seed, folder / PARTITION_FILE)
    needed = np.sort(np.concatenate([rows[split] for split in SPLITS]))
    images, files, cache_path = image_cache(folder, names[needed], image_size, md5)
    if len(files) == len(needed):
        position_of_row = dict(zip(needed.tolist(), range(len(needed))))
        positions = {s: np.array([position_of_row[r] for r in rows[s].tolist()], dtype=np.int64) for s in SPLITS}
    else:
        position_of_name = {name: i for i, name in enumerate(files)}
        positions = {s: np.array([position_of_name[n] for n in names[rows[s]].tolist()], dtype=np.int64)
                     for s in SPLITS}
    pixels = {s: _rows(images, positions[s]) for s in SPLITS}
    mean, std = channel_statistics(pixels["train"])
    statistics = torch.from_numpy(np.stack([mean, std]))[None]  # 1×2×3: (mean, std) per channel
    task_columns = [TASKS.index(t) for t in tasks]
    splits = {}
    for s in SPLITS:
        targets = {t: torch.from_numpy(attributes[rows[s], c]) for t, c in zip(tasks, task_columns)}
        inputs = {"images": pixels[s], "normalization": statistics.expand(len(rows[s]), 2, 3)}
        splits[s] = Examples(inputs, targets)
    info = {"train_size": train_size, "val_size": val_size, "test_size": test_size, "image_size": image_size,
            "data_seed": data_seed, "data_root": str(root), "folder": str(folder),
            "partition_sizes": {s: int((codes == i).sum()) for i, s in enumerate(SPLITS)},
            "files_md5": md5, "image_cache": str(cache_path), "preprocessing": PREPROCESSING,
            "normalization": {"mean": mean.tolist(), "std": std.tolist()}}  # model input: (raw/255 − mean) / std
    return single_input_data(tasks, splits, info)
