"""Decoding image files into 8-bit RGB (foldattn.train.images), and the image folder's hostile inputs."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foldattn.train.data import DatasetError, load_dataset
from foldattn.train.images import ImageError, read_rgb


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height pixels, with (almost) no data: what a decompression bomb
    looks like to a decoder before it starts."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


# (id, writer of the file, the expected 8-bit grey value, or the error text)
def _grey16(path: Path, value: int) -> None:
    Image.fromarray(np.full((4, 4), value, dtype=np.uint16)).save(path)  # mode I;16


def _float_tiff(path: Path, value: float) -> None:
    Image.fromarray(np.full((4, 4), value, dtype=np.float32), mode="F").save(path)


def _int32(path: Path, value: int) -> None:
    Image.fromarray(np.full((4, 4), value, dtype=np.int32), mode="I").save(path)


CASES = [
    ("grey16-white", "a.png", lambda p: _grey16(p, 65535), 255),
    ("grey16-mid", "a.png", lambda p: _grey16(p, 128 * 257), 128),
    ("grey16-black", "a.png", lambda p: _grey16(p, 0), 0),
    ("float-unit", "a.tif", lambda p: _float_tiff(p, 0.5), 128),
    ("float-one", "a.tif", lambda p: _float_tiff(p, 1.0), 255),
    ("float-255", "a.tif", lambda p: _float_tiff(p, 200.0), 200),
    ("int32-8bit", "a.tif", lambda p: _int32(p, 77), 77),
    ("int32-16bit", "a.tif", lambda p: _int32(p, 257 * 40), 40),
    ("rgba", "a.png", lambda p: Image.new("RGBA", (4, 4), (9, 9, 9, 0)).save(p), 9),
    ("palette", "a.png", lambda p: Image.new("P", (4, 4), 0).save(p), 0),
    ("float-out-of-range", "a.tif", lambda p: _float_tiff(p, 1e6), "no 8-bit meaning"),
    ("float-nan", "a.tif", lambda p: _float_tiff(p, float("nan")), "NaN"),
    ("int32-negative", "a.tif", lambda p: _int32(p, -5), "no 8-bit meaning"),
    ("bomb", "a.png", lambda p: _png_header_only(p, 40_000, 40_000), "decompression bomb"),
    ("truncated", "a.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\nxx"), "cannot read image"),
    ("not-an-image", "a.jpg", lambda p: p.write_text("hello"), "cannot read image"),
]


@pytest.mark.parametrize(("case", "name", "write", "expected"), CASES, ids=[c[0] for c in CASES])
def test_modes_are_rescaled_or_refused(tmp_path: Path, case: str, name: str, write: object,
                                       expected: int | str) -> None:
    path = tmp_path / name
    write(path)  # type: ignore[operator]
    if isinstance(expected, str):
        with pytest.raises(ImageError, match=expected) as info:
            read_rgb(path)
        assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1
        return
    image = read_rgb(path)
    assert image.mode == "RGB"
    assert np.asarray(image).min() == np.asarray(image).max() == expected


def test_hidden_files_and_folders_are_skipped_at_every_depth(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for c in ("a", "b"):
        (root / c / "sub").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / c / f"{i}.png")
    junk = [root / "a" / ".hidden.png", root / "a" / "._0.png", root / "a" / "sub" / ".x.png",
            root / "b" / ".ipynb_checkpoints" / "0-checkpoint.png", root / "b" / "sub" / ".cache" / "y.png"]
    for p in junk:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("not an image at all")  # would fail to decode if read
    bundle = load_dataset(f"imagefolder:{root}", val_split=2)
    assert len(bundle.train) + len(bundle.val) == 6


def test_a_bomb_in_the_folder_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / c / "0.png")
        Image.new("RGB", (8, 8)).save(root / c / "1.png")
    _png_header_only(root / "b" / "2.png", 30_000, 30_000)
    with pytest.raises(DatasetError, match=r"decompression bomb") as info:
        load_dataset(f"imagefolder:{root}", val_split=2)
    assert "2.png" in str(info.value)


def test_cache_is_keyed_by_the_bytes(tmp_path: Path) -> None:
    """An image edited in place with its size and modification time put back is decoded again."""
    root = tmp_path / "tree"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (10, 10, 10)).save(root / c / f"{i}.bmp")  # BMP: the size follows the shape
    cache = tmp_path / "cache"
    first = load_dataset(f"imagefolder:{root}", val_split=2, cache_dir=cache)
    target = root / "a" / "0.bmp"
    st = target.stat()
    Image.new("RGB", (8, 8), (250, 250, 250)).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    second = load_dataset(f"imagefolder:{root}", val_split=2, cache_dir=cache)
    total = lambda b: int(torch.cat([b.train.images, b.val.images]).sum())  # noqa: E731
    assert total(second) > total(first)
    assert len(list(cache.glob("*.pt"))) == 2


@pytest.mark.parametrize("blob", [
    {"images": torch.zeros(6, 3, 8, 8, dtype=torch.uint8), "labels": torch.full((6,), 7), "classes": ["a", "b"]},
    {"images": torch.zeros(6, 3, 8, 8), "labels": torch.zeros(6, dtype=torch.int64), "classes": ["a", "b"]},
    {"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "labels": torch.zeros(2, dtype=torch.int64),
     "classes": ["a", "b"]},
    ["not", "a", "dict"],
], ids=["label-out-of-range", "float-images", "wrong-count", "list"])
def test_a_crafted_cache_file_is_rebuilt(tmp_path: Path, blob: object) -> None:
    root = tmp_path / "tree"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / c / f"{i}.png")
    cache = tmp_path / "cache"
    load_dataset(f"imagefolder:{root}", val_split=2, cache_dir=cache)
    (path,) = cache.glob("*.pt")
    torch.save(blob, path)  # same name, other content
    bundle = load_dataset(f"imagefolder:{root}", val_split=2, cache_dir=cache)
    labels = torch.cat([bundle.train.labels, bundle.val.labels])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


# (id, writer of a 24x16 file at `path`): read_fitted at its own size must be read_rgb, pixel for pixel
def _noise(mode: str) -> object:
    def write(path: Path) -> None:
        rng = np.random.default_rng(0)
        if mode == "I;16":
            Image.fromarray(rng.integers(0, 65536, (16, 24), dtype=np.uint16)).save(path)
        elif mode == "P":
            Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).convert("P").save(path)
        else:
            Image.fromarray(rng.integers(0, 256, (16, 24, len(mode)), dtype=np.uint8).squeeze(), mode=mode).save(path)
    return write


SAME_SIZE = [("rgb-png", "a.png", _noise("RGB")), ("rgb-jpeg", "a.jpg", _noise("RGB")),
             ("grey-jpeg", "a.jpg", _noise("L")), ("rgba-png", "a.png", _noise("RGBA")),
             ("grey16-png", "a.png", _noise("I;16")), ("palette-png", "a.png", _noise("P"))]


@pytest.mark.parametrize(("case", "name", "write"), SAME_SIZE, ids=[c[0] for c in SAME_SIZE])
def test_read_fitted_at_the_files_size_is_read_rgb(tmp_path: Path, case: str, name: str, write: object) -> None:
    from foldattn.train.images import read_fitted

    path = tmp_path / name
    write(path)  # type: ignore[operator]
    image, original = read_fitted(path, (24, 16))
    assert original == (24, 16) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(read_rgb(path)))


# (id, file name, mode, (width, height) in the file, the most pixels its RGB conversion may see)
LARGE = [("jpeg-draft", "a.jpg", "RGB", (2400, 1600), 200 * 134),
         ("png-reduce", "a.png", "RGB", (2400, 1600), 200 * 134),
         ("grey-png-reduce", "a.png", "L", (2400, 1600), 200 * 134),
         ("palette-png-whole", "a.png", "P", (600, 400), 600 * 400)]


@pytest.mark.parametrize(("case", "name", "mode", "size", "most"), LARGE, ids=[c[0] for c in LARGE])
def test_a_large_image_is_shrunk_while_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str,
                                                  name: str, mode: str, size: tuple[int, int], most: int) -> None:
    from foldattn.train import images

    # a smooth pattern, so the shrunk and the direct resize agree closely
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1).astype(np.uint8)
    path = tmp_path / name
    Image.fromarray(rgb).convert(mode).save(path)
    seen: list[tuple[int, int]] = []
    to_rgb8 = images.to_rgb8
    monkeypatch.setattr(images, "to_rgb8", lambda im, name="image": seen.append(im.size) or to_rgb8(im, name))
    image, original = images.read_fitted(path, (48, 32))
    assert original == size and image.size == (48, 32) and image.mode == "RGB"
    assert seen[0][0] * seen[0][1] <= most
    direct = images.fit(read_rgb(path), (48, 32))
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(direct, dtype=np.int16)).mean() < 2


def test_fit_is_shorter_side_then_centre_crop() -> None:
    from foldattn.train.images import fit

    # 40x10, left half black and right half white: fitting 10x10 keeps the middle, half and half
    im = Image.fromarray(np.repeat(np.repeat(np.array([[0, 255]], dtype=np.uint8), 20, axis=1), 10, axis=0))
    out = np.asarray(fit(im.convert("RGB"), (10, 10)))[:, :, 0]
    assert out.shape == (10, 10) and (out[:, :4] == 0).all() and (out[:, 6:] == 255).all()
