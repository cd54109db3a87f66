"""Datasets for ``foldattn train``: a name registry of in-memory image datasets.

Every dataset is decoded once into a ``uint8`` tensor ``(N, C, H, W)`` plus labels,
so augmentation (the CIFAR recipe of He et al. 2016 used by the ASR paper: zero
padding + random crop + horizontal flip) runs on whole batches and data loading
is never the bottleneck on a few CPU cores.

Names accepted by :func:`load_dataset`:

* ``digits``: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, no
  network), upscaled to 16x16, grey replicated to 3 channels; the embedded default.
* ``cifar10``, ``cifar100``, ``stl10``: torchvision's on-disk formats under
  ``--data-dir`` (downloaded with ``download=True`` when online).
* ``imagefolder:PATH``: any ``PATH/<class>/<image>`` tree; a ``PATH/train`` +
  ``PATH/val`` (or ``test``) pair is used as given, otherwise a seeded, stratified
  validation split is held out. Every image is decoded at one training size
  (``image_size``, else the median size of a sample of the files, never the first
  file's; see :func:`_sampled_size`); a folder of mixed sizes says so in the notes.
  With ``stream=True`` (ImageNet-style trees) only the paths are kept and
  :class:`StreamLoader` decodes each batch in workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .._files import torch_load
from .._registry import Registry
from .._utils import atomic_path, require
from .augment import BatchPolicy, random_erasing, seeded
from .images import ImageError, read_fitted, read_rgb, read_size

__all__ = [
    "ImageData", "FileData", "DataBundle", "DatasetError", "TensorLoader", "StreamLoader", "make_loader",
    "register_dataset", "unregister_dataset", "DATASETS", "load_dataset", "list_datasets", "get_dataset",
    "stratified_split",
    "IMAGE_EXTENSIONS", "preprocessing", "with_preprocessing",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset is missing, empty or unreadable; the message says how to fix it."""


@dataclass
class ImageData:
    """Decoded images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor) -> ImageData:
        return ImageData(self.images[index], self.labels[index])


@dataclass
class FileData:
    """Image files and labels, decoded on the fly (trees too large to hold in memory)."""

    files: list[Path]
    labels: Tensor

    def __post_init__(self) -> None:
        if len(self.files) != self.labels.numel():
            raise DatasetError(f"{len(self.files)} files but {self.labels.numel()} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: Tensor) -> FileData:
        return FileData([self.files[i] for i in index.tolist()], self.labels[index])


@dataclass
class DataBundle:
    """Train and validation data plus what a model and the augmentation need to know."""

    name: str
    train: ImageData | FileData
    val: ImageData | FileData
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 4          # random-crop zero padding (0: no crop)
    flip: bool = True     # random horizontal flip
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    stream_size: int | None = None  # FileData: the training crop size

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1]) if isinstance(self.train, ImageData) else 3

    @property
    def image_size(self) -> tuple[int, int]:
        if isinstance(self.train, ImageData):
            return int(self.train.images.shape[2]), int(self.train.images.shape[3])
        size = self.stream_size or 224
        return size, size


Loader = Callable[..., DataBundle]
DATASETS: Registry[Loader] = Registry("dataset", case_sensitive=True)


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator: register ``fn(data_dir=..., val_split=..., split_seed=..., **kw) -> DataBundle`` as ``name``."""
    return DATASETS.register(name)


def unregister_dataset(name: str) -> Loader:
    """Remove a registered dataset (tests, plug-ins); returns its loader."""
    return DATASETS.unregister(name)


def get_dataset(name: str) -> Loader:
    """The loader function registered as ``name``."""
    return DATASETS.get(name)


def list_datasets() -> list[str]:
    """Registered names (``imagefolder`` takes a path: ``imagefolder:PATH``)."""
    return DATASETS.names()


def load_dataset(
    spec: str,
    data_dir: str | os.PathLike[str] | None = None,
    val_split: float | int | None = None,
    split_seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    download: bool = False,
    stream: bool = False,
) -> DataBundle:
    """Load the dataset named by ``spec`` (``digits``, ``cifar10``, ``imagefolder:PATH``, ...).

    Args:
        spec: a registered name, or ``imagefolder:PATH``.
        data_dir: root of torchvision-format datasets (default ``./data``).
        val_split: hold out this fraction (0 < f < 1) or number (>= 1) of training
            images, stratified by class, as the validation set; ``None`` keeps the
            dataset's own validation/test split where it has one.
        split_seed: seed of the stratified split (independent of the training seed).
        cache_dir: where ``imagefolder`` keeps its decoded tensor cache (None: no cache).
        image_size: ``imagefolder`` only: resize (shorter side) + centre-crop every image to
            this size; default: the median size of a sample of the files (see ``_sampled_size``).
        download: torchvision datasets only: download when missing (needs network).
        stream: ``imagefolder`` only: keep file paths and decode each batch on the fly
            (ImageNet-style trees; RandomResizedCrop + flip for training, resize +
            centre-crop for validation, ImageNet normalisation) instead of decoding
            everything into memory.
    """
    name, _, arg = spec.partition(":")
    if name not in DATASETS.names():
        raise DatasetError(f"unknown dataset {spec!r}; valid: {', '.join(list_datasets())} (imagefolder:PATH)")
    if name == "imagefolder" and not arg:
        raise DatasetError("imagefolder needs a path: --dataset imagefolder:PATH (PATH/<class>/<image>.jpg)")
    if stream and name != "imagefolder":
        raise DatasetError(f"--stream applies to imagefolder:PATH only; {name!r} is held in memory")
    if name != "imagefolder" and arg:
        raise DatasetError(f"dataset {name!r} takes no ':' argument (got {spec!r}); use --data-dir for its location")
    kwargs = {"data_dir": Path(data_dir or "data"), "val_split": val_split, "split_seed": split_seed,
              "cache_dir": cache_dir, "image_size": image_size, "download": download}
    if arg:
        kwargs["path"] = Path(arg)
        kwargs["stream"] = stream
    return DATASETS.get(name)(**kwargs)


def stratified_split(labels: Tensor, val: float | int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)``: ``val`` (fraction or count) taken from each class in proportion.

    Per-class counts use largest remainders so they sum exactly to the requested total;
    the choice within each class is a permutation from a generator seeded with ``seed``.
    Both index lists come in a seeded random order, not sorted: image folders list their
    files class by class, and a pass capped at the first N images (``record_stripes``,
    ``calibrate``) must see every class, not the first one or two.
    """
    n = labels.numel()
    if isinstance(val, float) and not 0 < val < 1:
        raise DatasetError(f"validation split {val!r} leaves no train or no validation image: a fraction must "
                           "be in (0, 1), a count an integer")
    n_val = round(val * n) if isinstance(val, float) else int(val)
    if not 0 < n_val < n:
        raise DatasetError(f"validation split {val!r} leaves no train or no validation image out of {n}")
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * n_val / n
    take = exact.floor().long()
    order = (exact - take).argsort(descending=True, stable=True)
    take[order[: n_val - int(take.sum())]] += 1
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, va = torch.cat(train_idx), torch.cat(val_idx)
    return tr[torch.randperm(tr.numel(), generator=g)], va[torch.randperm(va.numel(), generator=g)]


def _mixed(data: Any, seed: int) -> Any:
    """``data`` in a seeded random order (an image folder is listed class by class)."""
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)))


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of ``images`` scaled to [0, 1], rounded to 4 decimals.

    Two passes over chunks of about 256 MB of float64: a float64 copy of the whole tensor would take
    eight times the memory the decoded dataset was bounded by."""
    n, c, h, w = images.shape
    step = max(1, (32 << 20) // max(1, c * h * w))
    chunks = [images[i:i + step] for i in range(0, n, step)]
    count = n * h * w
    total = torch.zeros(c, dtype=torch.float64)
    for x in chunks:
        total += x.double().sum(dim=(0, 2, 3))
    mean = total / count / 255
    squares = torch.zeros(c, dtype=torch.float64)
    for x in chunks:
        squares += (x.double().div_(255) - mean.view(1, -1, 1, 1)).square_().sum(dim=(0, 2, 3))
    std = (squares / max(1, count - 1)).sqrt().clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def preprocessing(bundle: DataBundle) -> dict[str, Any]:
    """What a model trained on ``bundle`` expects: ``{"mean", "std", "size"}`` (inputs scaled to [0, 1],
    then ``(x - mean) / std`` per channel, at ``size`` = (height, width))."""
    return {"mean": [float(m) for m in bundle.mean], "std": [float(s) for s in bundle.std],
            "size": list(bundle.image_size)}


def with_preprocessing(bundle: DataBundle, recorded: dict[str, Any] | None) -> DataBundle:
    """``bundle`` normalised as a checkpoint recorded (its own statistics when nothing is recorded)."""
    if not recorded:
        return bundle
    mean, std = tuple(float(m) for m in recorded["mean"]), tuple(float(s) for s in recorded["std"])
    if len(mean) != bundle.in_channels or len(std) != bundle.in_channels or min(std) <= 0:
        raise DatasetError(f"the recorded preprocessing {recorded} does not fit {bundle.in_channels}-channel images")
    return dataclasses.replace(bundle, mean=mean, std=std)


def _split(data: ImageData | FileData, val_split: float | int, seed: int) -> tuple[Any, Any]:
    tr, va = stratified_split(data.labels, val_split, seed)
    return data.subset(tr), data.subset(va)


# ----------------------------------------------------------------------------- digits
_DIGITS_CSV = ("datasets", "data", "digits.csv.gz")  # inside the installed scikit-learn package


def _digits_arrays() -> tuple[Any, Any]:
    """The 1,797 digits as (N, 8, 8) float pixels 0..16 and (N,) int64 labels.

    scikit-learn ships them as a gzipped CSV (64 pixels, then the label, per row). Reading that file
    directly skips ``import sklearn.datasets`` (about a second per process, which every digits run,
    demo and test would pay); anything unexpected about the file falls back to ``load_digits``.
    """
    import importlib.util

    import numpy as np

    try:
        spec = importlib.util.find_spec("sklearn")
        path = Path(spec.origin).parent.joinpath(*_DIGITS_CSV) if spec and spec.origin else None
        if path is not None and path.is_file() and path.stat().st_size < 1 << 20:
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
            if table.shape == (1797, 65) and table.min() >= 0 and table[:, :64].max() <= 16 \
                    and table[:, 64].max() <= 9 and np.array_equal(table, np.round(table)):
                return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    except (ValueError, OSError):
        pass
    raw = require("sklearn.datasets", "train").load_digits()
    return raw.images, raw.target


@register_dataset("digits")
def _digits(val_split: float | int | None = None, split_seed: int = 0, **_: object) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits, bilinearly upscaled to 16x16, 3 channels."""
    pixels, targets = _digits_arrays()
    x = torch.from_numpy(pixels).float().div(16).unsqueeze(1)  # values 0..16
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    images = x.mul(255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    data = ImageData(images, torch.from_numpy(targets))
    train, val = _split(data, 0.2 if val_split is None else val_split, split_seed)
    mean, std = _channel_stats(train.images)
    return DataBundle("digits", train, val, [str(i) for i in range(10)], mean, std, pad=2, flip=False)


# ----------------------------------------------------------------------------- torchvision formats
_TV_FILES = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}"),
    "cifar100": ("CIFAR100", "cifar-100-python/{train, test, meta}"),
    "stl10": ("STL10", "stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt}"),
}
# per-dataset channel statistics used to normalise (CIFAR-10's are those of the ASR reference code,
# which normalises CIFAR-100 with CIFAR-10's statistics too: `import-reference` records that)
_TV_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}


def _torchvision(name: str, data_dir: Path, download: bool) -> tuple[ImageData, ImageData, list[str]]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TV_FILES[name][0])
    splits: list[ImageData] = []
    classes: list[str] = []
    for train in (True, False):
        kw = {"split": "train" if train else "test"} if name == "stl10" else {"train": train}
        try:
            ds = cls(str(data_dir), download=download, **kw)
        except RuntimeError as e:
            raise DatasetError(
                f"{name} not found or corrupt under {data_dir.resolve()} ({e}). Expected torchvision's layout: "
                f"{data_dir}/{_TV_FILES[name][1]}. Point --data-dir at the folder holding it, or pass --download "
                "when online."
            ) from None
        except OSError as e:  # network errors while downloading
            raise DatasetError(f"could not download {name} ({e}); offline, place {_TV_FILES[name][1]} under "
                               f"--data-dir (now {data_dir})") from None
        if name == "stl10":
            images, labels = torch.from_numpy(ds.data), torch.from_numpy(ds.labels)
        else:
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            labels = torch.tensor(ds.targets)
        splits.append(ImageData(images, labels))
        classes = list(ds.classes)
    return splits[0], splits[1], classes


def _tv_loader(name: str) -> Loader:
    def load(data_dir: Path, val_split: float | int | None = None, split_seed: int = 0, download: bool = False,
             **_: object) -> DataBundle:
        train, test, classes = _torchvision(name, data_dir, download)
        train, test = _mixed(train, split_seed), _mixed(test, split_seed)  # STL-10 lists its test split by class
        notes = {"validation": "the official test split"}
        if val_split is not None:
            train, test = _split(train, val_split, split_seed)
            notes = {"validation": f"{len(test)} training images held out (stratified, seed {split_seed})"}
        mean, std = _TV_STATS[name]
        return DataBundle(name, train, test, classes, mean, std, pad=4 if name != "stl10" else 12, flip=True,
                          notes=notes)

    load.__doc__ = f"torchvision {name} from ``data_dir``; the test split validates unless ``val_split`` is set."
    return load


for _name in _TV_FILES:
    register_dataset(_name)(_tv_loader(_name))


# ----------------------------------------------------------------------------- imagefolder
def _scan(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders; expected {root}/<class>/<image>.jpg")
    files: list[tuple[Path, int]] = []
    empty = []
    for i, c in enumerate(classes):
        found = sorted(_images_under(root / c))
        if not found:
            empty.append(c)
        files.extend((p, i) for p in found)
    if not files:
        raise DatasetError(f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)} in {len(classes)} "
                           f"class folders); expected {root}/<class>/<image>.jpg")
    if empty:
        raise DatasetError(f"class folders without images under {root}: {', '.join(empty[:10])}; remove them or "
                           "add images")
    return classes, files


def _images_under(folder: Path) -> list[Path]:
    """Image files under ``folder`` at any depth; hidden files and folders (a leading ``.``: editor
    backups, ``.ipynb_checkpoints``, macOS ``._*`` files) are skipped at every depth."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return [p for p in out if p.is_file()]


def _read_fitted(path: Path, size: tuple[int, int]) -> tuple[Any, tuple[int, int]]:
    try:
        return read_fitted(path, size)
    except ImageError as e:
        raise DatasetError(str(e)) from None


def _read_size(path: Path) -> tuple[int, int]:
    try:
        return read_size(path)
    except ImageError as e:
        raise DatasetError(str(e)) from None


#: files whose headers choose the size of a folder given no image size
SAMPLE_FILES = 64
#: the sides (pixels) a sampled size may have; outside them the folder needs an explicit image size
SAMPLED_SIDES = (8, 1024)
#: the share of the machine's memory the decoded tensor may take (the train/val split briefly copies it)
MEMORY_SHARE = 1 / 3
_MEMORY_UNKNOWN = 8 << 30  # assumed where the machine's memory cannot be read


def _sampled_size(root: Path, files: list[tuple[Path, int]]) -> tuple[int, int]:
    """``(height, width)`` for a folder given no image size: the medians (``median_low``, a size some
    file has) of the header sizes of up to :data:`SAMPLE_FILES` files at evenly spaced positions of the
    class-sorted file list (every file when there are fewer), so each class is sampled in proportion to
    its files and no single file, the first one included, decides it. Only headers are read."""
    n = len(files)
    k = min(n, SAMPLE_FILES)
    sizes = [_read_size(files[(2 * i + 1) * n // (2 * k)][0]) for i in range(k)]
    w, h = statistics.median_low(s[0] for s in sizes), statistics.median_low(s[1] for s in sizes)
    lo, hi = SAMPLED_SIDES
    if not (lo <= w <= hi and lo <= h <= hi):
        raise DatasetError(f"the images under {root} are typically {w}x{h} pixels (width x height, the median of "
                           f"{k} sampled files), outside the {lo}..{hi} a training size is taken from; pass "
                           "--image-size N to choose it")
    return h, w


def _memory_bytes() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX, or not reported
        return _MEMORY_UNKNOWN
    return total if total > 0 else _MEMORY_UNKNOWN


def _check_memory(path: Path, count: int, size: tuple[int, int]) -> None:
    """Refuse a decoded tensor of ``count`` images at ``size`` larger than :data:`MEMORY_SHARE` of memory."""
    h, w = size
    memory = _memory_bytes()
    need, limit = count * 3 * h * w, int(memory * MEMORY_SHARE)
    if need > limit:
        raise DatasetError(f"{count:,} images under {path} at {w}x{h} take {need / 2**30:.1f} GiB decoded, more than "
                           f"the {limit / 2**30:.1f} GiB (a third of {memory / 2**30:.1f} GiB of memory) held in "
                           "memory; add --stream to decode each batch from the files, or pass a smaller --image-size")


def _decode(files: list[tuple[Path, int]], size: tuple[int, int]) -> tuple[ImageData, Counter[tuple[int, int]]]:
    """The images at ``size = (height, width)``, and how many files had each ``(width, height)``."""
    h, w = size
    out = torch.empty(len(files), 3, h, w, dtype=torch.uint8)
    sizes: Counter[tuple[int, int]] = Counter()
    for i, (path, _) in enumerate(files):
        im, original = _read_fitted(path, (w, h))
        sizes[original] += 1
        out[i] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)
    return ImageData(out, torch.tensor([c for _, c in files])), sizes


_CACHE_VERSION = 4  # bump when the decoding changes (4: one sampled or given size, file sizes kept)


def _content_key(root: Path, size: tuple[int, int], files: list[tuple[Path, int]], classes: list[str]) -> str:
    """A key over everything that defines the decoded tensor: each file's path relative to the root, its
    bytes (a hash: an edited image with its size and time put back still changes the key), its class,
    the class names, the image size and the decoder version."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}|size={size[0]}x{size[1]}|classes={'/'.join(classes)}".encode())
    for path, label in files:
        h.update(f"\n{path.relative_to(root).as_posix()}|{label}|".encode())
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest() if hasattr(hashlib, "file_digest")
                     else hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:24]


def _folder(root: Path, classes: list[str], files: list[tuple[Path, int]], size: tuple[int, int],
            cache_dir: str | os.PathLike[str] | None) -> tuple[ImageData, Counter[tuple[int, int]]]:
    """The scanned ``files`` decoded at ``size`` (or read from the cache), and the files' own sizes."""
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"imagefolder-{_content_key(root, size, files, classes)}.pt"
        if cache.is_file():
            cached = _read_cache(cache, len(files), classes, size)
            if cached is not None:
                return cached
    data, sizes = _decode(files, size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        table = torch.tensor([[w, h, n] for (w, h), n in sorted(sizes.items())], dtype=torch.int64)
        with atomic_path(cache) as tmp:
            torch.save({"images": data.images, "labels": data.labels, "classes": classes, "sizes": table}, tmp)
    return data, sizes


def _read_cache(cache: Path, count: int, classes: list[str],
                size: tuple[int, int]) -> tuple[ImageData, Counter[tuple[int, int]]] | None:
    """The decoded tensor in ``cache`` and the files' sizes, if it is what this folder decodes to at ``size``
    (structure checked: a cache file is read like any other file); None for a stale, broken or foreign one,
    which is then rebuilt."""
    try:
        blob = torch_load(cache, "image cache")
    except Exception:  # a stale, broken or crafted cache is rebuilt
        return None
    if not isinstance(blob, dict) or blob.get("classes") != classes:
        return None
    images, labels, table = blob.get("images"), blob.get("labels"), blob.get("sizes")
    ok = (isinstance(images, Tensor) and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[0] == count
          and images.shape[1] == 3 and tuple(images.shape[2:]) == tuple(size)
          and isinstance(labels, Tensor) and labels.dtype == torch.int64 and tuple(labels.shape) == (count,)
          and (count == 0 or (int(labels.min()) >= 0 and int(labels.max()) < len(classes)))
          and isinstance(table, Tensor) and table.dtype == torch.int64 and table.dim() == 2 and table.shape[1] == 3
          and (table.numel() == 0 or int(table.min()) >= 1) and int(table[:, 2].sum()) == count)
    if not ok:
        return None
    # ok: all three are tensors
    return (ImageData(cast(Tensor, images), cast(Tensor, labels)),
            Counter({(w, h): n for w, h, n in cast(Tensor, table).tolist()}))


def _kept(image: tuple[int, int], target: tuple[int, int]) -> float:
    """The share of an image of ``image = (width, height)`` a centre crop to ``target``'s aspect keeps."""
    a, b = image[0] / image[1], target[0] / target[1]
    return min(a / b, b / a)


def _size_notes(sizes: Counter[tuple[int, int]], size: tuple[int, int], how: str) -> dict[str, str]:
    """Notes on the training size and on the files that were not at it (sizes as width x height)."""
    h, w = size
    notes = {"image size": f"{w}x{h} (width x height; {how})"}
    if set(sizes) != {(w, h)}:
        listed = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = "; ".join(f"{a}x{b}: {n:,}" for (a, b), n in listed[:6])
        more = f"; {len(listed) - 6:,} more sizes" if len(listed) > 6 else ""
        notes["mixed sizes"] = (f"images of {len(listed)} size{'s' if len(listed) > 1 else ''} ({shown}{more}) "
                                f"resized to {w}x{h}")
    cropped = {s: n for s, n in sizes.items() if _kept(s, (w, h)) < 0.5}
    if cropped:
        worst = min(cropped, key=lambda s: _kept(s, (w, h)))
        notes["aspect ratios"] = (f"{sum(cropped.values()):,} image(s) lose more than half their area to the centre "
                                  f"crop (the most elongated: {worst[0]}x{worst[1]}, {_kept(worst, (w, h)):.1%} kept)")
    return notes


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _split_layout(path: Path, val_split: float | int | None) -> tuple[Path, Path | None]:
    """The training tree and the validation tree (or None: hold out ``val_split``) under ``path``.

    ``PATH/train`` (+ ``PATH/val`` or ``PATH/test``), with no other sub-folders, is a split
    layout (the CIFAR-10 JPEG archive has only ``train/``); anything else is one class tree.
    An explicit ``val_split`` holds images out of ``PATH/train`` and ignores the ``val`` tree.
    """
    subdirs = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")} if path.is_dir() else set()
    if "train" not in subdirs or not subdirs <= {"train", "val", "test"}:
        return path, None
    val = next((path / d for d in ("val", "test") if d in subdirs), None)
    return path / "train", (val if val_split is None else None)


def _streamed(path: Path, val_split: float | int | None, split_seed: int, image_size: int | None) -> DataBundle:
    root, val_dir = _split_layout(path, val_split)
    if val_dir is not None:
        classes, files = _scan(root)
        val_classes, val_files = _scan(val_dir)
        if val_classes != classes:
            raise DatasetError(f"{root} and {val_dir} have different class folders")
        train = _mixed(FileData([p for p, _ in files], torch.tensor([c for _, c in files])), split_seed)
        val = _mixed(FileData([p for p, _ in val_files], torch.tensor([c for _, c in val_files])), split_seed)
        notes = {"validation": str(val_dir)}
    else:
        classes, files = _scan(root)
        data = FileData([p for p, _ in files], torch.tensor([c for _, c in files]))
        train, val = _split(data, 0.1 if val_split is None else val_split, split_seed)
        notes = {"validation": f"{len(val)} images held out (stratified, seed {split_seed})"}
    notes["loading"] = "streamed (decoded per batch)"
    return DataBundle(f"imagefolder:{path}", train, val, classes, IMAGENET_MEAN, IMAGENET_STD, pad=0, flip=True,
                      notes=notes, stream_size=image_size or 224)


@register_dataset("imagefolder")
def _imagefolder(path: Path, val_split: float | int | None = None, split_seed: int = 0,
                 cache_dir: str | os.PathLike[str] | None = None, image_size: int | None = None,
                 stream: bool = False, **_: object) -> DataBundle:
    """``PATH/<class>/<image>``, or ``PATH/train`` + ``PATH/val`` (or ``test``) trees, decoded at one size."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DatasetError(f"image size {image_size!r} is not a positive whole number of pixels (--image-size N)")
    if stream:
        return _streamed(path, val_split, split_seed, image_size)
    root, val_dir = _split_layout(path, val_split)
    classes, files = _scan(root)
    val_files: list[tuple[Path, int]] = []
    if val_dir is not None:
        val_classes, val_files = _scan(val_dir)
        if val_classes != classes:
            raise DatasetError(f"{root} and {val_dir} have different class folders")
    if image_size is not None:
        size, how = (image_size, image_size), "the image size given"
    else:
        size = _sampled_size(root, files)
        how = f"the median of {min(len(files), SAMPLE_FILES)} sampled files; --image-size N to choose"
    _check_memory(path, len(files) + len(val_files), size)  # before the tensor is allocated
    data, sizes = _folder(root, classes, files, size, cache_dir)
    if val_dir is not None:
        val, val_sizes = _folder(val_dir, classes, val_files, size, cache_dir)
        sizes += val_sizes
        train, val = _mixed(data, split_seed), _mixed(val, split_seed)
        notes = {"validation": str(val_dir)}
    else:
        split = 0.1 if val_split is None else val_split
        train, val = _split(data, split, split_seed)
        notes = {"validation": f"{len(val)} images held out (stratified, seed {split_seed})"}
    del data  # the split made copies: only they are kept
    notes.update(_size_notes(sizes, size, how))
    mean, std = _channel_stats(train.images)
    return DataBundle(f"imagefolder:{path}", train, val, classes, mean, std, pad=max(1, train.images.shape[-1] // 8),
                      flip=True, notes=notes)


# ----------------------------------------------------------------------------- batches
class TensorLoader:
    """Batches of an :class:`ImageData`, augmented and normalised on the fly.

    The order of epoch ``e`` is a permutation from a generator seeded with
    ``(seed, e)`` and the augmentation of batch ``b`` uses one seeded with
    ``(seed, e, b)``, so any batch can be reproduced without replaying the ones
    before it (exact resume, also mid-epoch). With ``world > 1`` every rank walks
    the same global batches and takes its own slice (DDP).

    Args:
        data: the images.
        batch_size: the global batch size (split evenly across ``world`` ranks).
        mean, std: per-channel normalisation (of images scaled to [0, 1]).
        train: shuffle, drop the last partial batch, and augment.
        pad, flip: random crop with this zero padding; random horizontal flip.
        channels_last: return batches in ``torch.channels_last`` memory format.
        aa: an image policy (``--aa``, :mod:`~foldattn.train.augment`) applied after crop and flip.
        reprob: random-erasing probability, applied to the normalised batch.
        device: keep the uint8 images there (a GPU) and crop, flip and normalise there too, so a small
            model is not bound by the CPU feeding it (``--data-on-device``). The random crops and flips
            come from the same CPU generators, so the batches are the same as on the CPU (exact resume holds).
    """

    def __init__(self, data: ImageData, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 train: bool, pad: int = 0, flip: bool = False, seed: int = 0, rank: int = 0, world: int = 1,
                 channels_last: bool = False, aa: str | None = None, reprob: float = 0.0,
                 device: torch.device | str | None = None) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world} processes")
        if train and len(data) < batch_size:
            raise DatasetError(f"only {len(data)} training images for a batch of {batch_size}; lower --batch-size")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type != "cpu":
            if aa and train:
                raise ValueError("--aa runs per image on the CPU; drop --data-on-device (or --aa)")
            data = ImageData(data.images.to(self.device), data.labels.to(self.device))
        self.data, self.batch_size, self.train = data, batch_size, train
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.pad, self.flip, self.seed = pad, flip, seed
        self.rank, self.world, self.channels_last = rank, world, channels_last
        self.epoch = 0
        in_memory = isinstance(data, ImageData)
        self.policy = BatchPolicy(aa, int(data.images.shape[-1]), mean) if aa and train and in_memory else None
        self.erasing = random_erasing(reprob) if reprob > 0 and train and in_memory else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _order(self) -> Tensor:
        if not self.train:
            return torch.arange(len(self.data))
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))

    def _rank_indices(self, order: Tensor, b: int) -> Tensor:
        """This rank's sample indices of global batch ``b`` (training: equal shares; eval: strided)."""
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        if self.train:
            local = self.batch_size // self.world
            return idx[self.rank * local:(self.rank + 1) * local]
        return idx[self.rank::self.world]

    def batches(self, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` from batch index ``start`` on (this rank's share)."""
        order = self._order()
        for b in range(start, len(self)):
            idx = self._rank_indices(order, b).to(self.device)
            x = self.data.images[idx]
            key = (self.seed * 100_003 + self.epoch) * 65_537 + b
            if self.train:
                x = self._augment(x, torch.Generator().manual_seed(key))
            if self.policy is not None:
                with seeded(key * 2 + 1):
                    x = self.policy(x)
            x = self._normalise(x)
            if self.erasing is not None:
                with seeded(key * 2 + 2):
                    x = self.erasing(x)
            yield x, self.data.labels[idx]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.batches()

    def _augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        if self.pad:
            p = self.pad
            padded = F.pad(x, (p, p, p, p))
            dev = x.device  # the offsets come from the CPU generator wherever the images are
            oy = torch.randint(0, 2 * p + 1, (n,), generator=g).to(dev)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=g).to(dev)
            rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]      # (n, h, 1)
            cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]      # (n, 1, w)
            x = padded.permute(0, 2, 3, 1)[torch.arange(n, device=dev)[:, None, None], rows, cols].permute(0, 3, 1, 2)
        if self.flip:
            mask = (torch.rand(n, generator=g) < 0.5).to(x.device)
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return x

    def _normalise(self, x: Tensor) -> Tensor:
        x = (x.float().div_(255) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()


def _read_rgb(path: Path) -> Any:
    try:
        return read_rgb(path)
    except ImageError as e:
        raise DatasetError(str(e)) from None


class _FileDataset(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """Decodes and transforms one file; the randomness of sample ``i`` in epoch ``e`` is seeded by
    ``(seed, e, i)``, so batches do not depend on worker count or on the batches before them."""

    def __init__(self, data: FileData, transform: Callable[[Any], Tensor], seed: int, random: bool) -> None:
        self.data, self.transform, self.seed, self.random = data, transform, seed, random
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image = _read_rgb(self.data.files[i])
        if self.random:  # torch (crops), Python's random and NumPy (timm's policies, erasing)
            with seeded(((self.seed * 100_003 + self.epoch) * 1_000_003 + i) % (2**63)):
                x = self.transform(image)
        else:
            x = self.transform(image)
        return x, self.data.labels[i]


class StreamLoader(TensorLoader):
    """:class:`TensorLoader`'s batches (same order, same DDP slicing) decoded from files by a
    ``DataLoader`` with ``workers`` processes: RandomResizedCrop + flip for training, resize +
    centre crop for validation (Szegedy et al. 2015 / the torchvision ImageNet recipe); ``aa``
    after the flip and random erasing (``reprob``) after the normalisation, per image."""

    def __init__(self, data: FileData, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 train: bool, image_size: int = 224, seed: int = 0, rank: int = 0, world: int = 1,
                 channels_last: bool = False, workers: int = 0, aa: str | None = None, reprob: float = 0.0) -> None:
        from torchvision import transforms as T

        from .augment import image_policy

        super().__init__(data, batch_size, mean, std, train, seed=seed, rank=rank, world=world,  # type: ignore[arg-type]
                         channels_last=channels_last)
        norm = [T.ToTensor(), T.Normalize(mean, std)]
        if train:
            policy = [image_policy(aa, image_size, mean)] if aa else []
            erase = [random_erasing(reprob)] if reprob > 0 else []
            tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *policy, *norm, *erase])
        else:
            tf = T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), *norm])
        self.dataset = _FileDataset(data, tf, seed, random=train)
        self.workers = workers

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.epoch = epoch

    def batches(self, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._order()
        chunks = []
        for b in range(start, len(self)):
            idx = self._rank_indices(order, b)
            chunks.append(idx.tolist())
        if not chunks:
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=chunks, num_workers=self.workers,
                                             pin_memory=torch.cuda.is_available())
        for x, y in loader:
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y


def make_loader(data: ImageData | FileData, batch_size: int, bundle: DataBundle, train: bool, seed: int = 0,
                rank: int = 0, world: int = 1, channels_last: bool = False, workers: int = 0,
                aa: str | None = None, reprob: float = 0.0, device: torch.device | None = None) -> TensorLoader:
    """The right loader for ``data``: :class:`TensorLoader` in memory (on ``device`` if given), :class:`StreamLoader`
    for files (``aa`` and ``reprob`` apply to training loaders only)."""
    if not train:
        aa, reprob = None, 0.0
    if isinstance(data, FileData):
        return StreamLoader(data, batch_size, bundle.mean, bundle.std, train, bundle.image_size[0], seed, rank,
                            world, channels_last, workers, aa=aa, reprob=reprob)
    return TensorLoader(data, batch_size, bundle.mean, bundle.std, train, pad=bundle.pad if train else 0,
                        flip=bundle.flip and train, seed=seed, rank=rank, world=world, channels_last=channels_last,
                        aa=aa, reprob=reprob, device=device)
