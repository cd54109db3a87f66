"""Datasets and the batch loader of foldattn.train.data."""

from __future__ import annotations

from pathlib import Path

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from foldattn.train.data import (
    DataBundle,
    DatasetError,
    ImageData,
    TensorLoader,
    list_datasets,
    load_dataset,
    register_dataset,
    stratified_split,
    unregister_dataset,
)


def _tree(root: Path, classes: dict[str, int], size: tuple[int, int] = (8, 8)) -> Path:
    g = torch.Generator().manual_seed(0)
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            px = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.png")
    return root


def test_digits_is_embedded_and_stratified() -> None:
    b = load_dataset("digits")
    assert b.num_classes == 10 and b.in_channels == 3 and b.image_size == (16, 16)
    assert len(b.train) + len(b.val) == 1797
    val = b.val.labels.bincount(minlength=10).float()
    frac = val / (b.train.labels.bincount(minlength=10).float() + val)
    assert torch.allclose(frac, torch.full((10,), 0.2), atol=0.02)


def test_digits_read_from_the_installed_csv_equal_load_digits(monkeypatch, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from foldattn.train import data

    raw = load_digits()
    pixels, labels = data._digits_arrays()
    assert numpy.array_equal(pixels, raw.images) and numpy.array_equal(labels, raw.target)
    # a file that is not what scikit-learn ships falls back to load_digits
    fake = tmp_path / "sklearn"
    (fake / "datasets" / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "datasets" / "data" / "digits.csv.gz").write_bytes(b"1,2,3\n")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: type("S", (), {"origin": str(fake / "__init__.py")}))
    pixels, labels = data._digits_arrays()
    assert numpy.array_equal(pixels, raw.images) and numpy.array_equal(labels, raw.target)


@pytest.mark.parametrize("val", [0.25, 7])
def test_stratified_split_counts_and_seed(val: float | int) -> None:
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 8)
    tr, va = stratified_split(labels, val, seed=3)
    expected = round(val * 28) if isinstance(val, float) else val
    assert va.numel() == expected and tr.numel() == 28 - expected
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert (labels[va].bincount(minlength=3) >= 1).all()  # every class represented
    _, va2 = stratified_split(labels, val, seed=3)
    assert torch.equal(va, va2)
    assert not torch.equal(va, stratified_split(labels, val, seed=4)[1])


@pytest.mark.parametrize("val", [0, 28, 1.0])
def test_stratified_split_rejects_degenerate(val: float | int) -> None:
    with pytest.raises(DatasetError, match="leaves no"):
        stratified_split(torch.zeros(28, dtype=torch.long), val)


def test_imagefolder_split_and_cache(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", {"a": 6, "b": 6, "c": 6})
    b = load_dataset(f"imagefolder:{root}", val_split=6, cache_dir=tmp_path / "cache")
    assert b.classes == ["a", "b", "c"] and len(b.train) == 12 and len(b.val) == 6
    assert b.val.labels.bincount().tolist() == [2, 2, 2]
    assert list((tmp_path / "cache").glob("*.pt"))
    again = load_dataset(f"imagefolder:{root}", val_split=6, cache_dir=tmp_path / "cache")
    assert torch.equal(again.train.images, b.train.images)
    # the decoded pixels are the files' pixels
    first = torch.from_numpy(numpy.array(Image.open(root / "a" / "0.png"))).permute(2, 0, 1)
    assert any(torch.equal(first, img) for img in torch.cat([b.train.images, b.val.images]))


def test_imagefolder_cache_follows_the_content(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    g = torch.Generator().manual_seed(3)
    for c, value in (("a", 10), ("b", 200)):  # class a dark, class b bright: labels visible in the pixels
        (root / c).mkdir(parents=True)
        for i in range(4):
            px = (torch.full((8, 8, 3), value) + torch.randint(0, 5, (8, 8, 3), generator=g)).to(torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.png")

    def dark_label(bundle) -> set[int]:
        data = ImageData(torch.cat([bundle.train.images, bundle.val.images]),
                         torch.cat([bundle.train.labels, bundle.val.labels]))
        return {int(y) for x, y in zip(data.images, data.labels, strict=True) if x.float().mean() < 100}

    cache = tmp_path / "cache"
    first = load_dataset(f"imagefolder:{root}", val_split=2, cache_dir=cache)
    assert dark_label(first) == {0}
    # swap the two class folders: same names, counts, sizes; a path-and-count key would serve stale labels
    (root / "a").rename(root / "tmp")
    (root / "b").rename(root / "a")
    (root / "tmp").rename(root / "b")
    swapped = load_dataset(f"imagefolder:{root}", val_split=2, cache_dir=cache)
    assert dark_label(swapped) == {1}
    assert len(list(cache.glob("*.pt"))) == 2


def test_imagefolder_train_val_layout_and_resize(tmp_path: Path) -> None:
    _tree(tmp_path / "train", {"x": 3, "y": 3}, size=(12, 10))
    _tree(tmp_path / "val", {"x": 1, "y": 1}, size=(12, 10))
    b = load_dataset(f"imagefolder:{tmp_path}", image_size=8)
    assert len(b.train) == 6 and len(b.val) == 2 and b.image_size == (8, 8)


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("with_val", [False, True], ids=["train-only", "train+val"])
def test_imagefolder_split_layout_with_val_split(tmp_path: Path, stream: bool, with_val: bool) -> None:
    # the CIFAR-10 JPEG archive's layout: PATH/train/<class>/... and nothing else; the classes are
    # the folders under train/, never "train" and "val" themselves
    _tree(tmp_path / "train", {"x": 4, "y": 4})
    if with_val:
        _tree(tmp_path / "val", {"x": 1, "y": 1})
    b = load_dataset(f"imagefolder:{tmp_path}", val_split=2, stream=stream, image_size=8)
    assert b.classes == ["x", "y"] and len(b.train) == 6 and len(b.val) == 2


def test_imagefolder_no_images_message_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=rf"expected {tmp_path}/<class>/<image>.jpg"):
        load_dataset(f"imagefolder:{tmp_path}", stream=True)


@pytest.mark.parametrize("case", ["empty", "no-images", "empty-class", "corrupt", "missing"])
def test_imagefolder_bad_input(tmp_path: Path, case: str) -> None:
    root = tmp_path / "t"
    if case == "no-images":
        (root / "a").mkdir(parents=True)
        (root / "a" / "notes.txt").write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "empty-class":
        _tree(root, {"a": 2})
        (root / "b").mkdir()
    elif case == "corrupt":
        _tree(root, {"a": 3, "b": 3})
        (root / "b" / "1.png").write_bytes(b"\x89PNG truncated")
    msg = {"empty": "no class sub-folders", "no-images": "no images", "empty-class": "without images under .*: b",
           "corrupt": "1.png", "missing": "does not exist"}[case]
    with pytest.raises(DatasetError, match=msg):
        load_dataset(f"imagefolder:{root}")


@pytest.mark.parametrize("name, expected", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                            ("stl10", "stl10_binary")])
def test_torchvision_offline_message(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DatasetError, match=rf"(?s){expected}.*--data-dir"):
        load_dataset(name, data_dir=tmp_path)


def test_register_and_unregister_a_dataset() -> None:
    images = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(20) % 2

    @register_dataset("tiny_test_set")
    def _tiny(**_: object) -> DataBundle:
        data = ImageData(images, labels)
        return DataBundle("tiny_test_set", data, data, ["a", "b"], (0.5,) * 3, (0.25,) * 3)

    try:
        assert "tiny_test_set" in list_datasets()
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("tiny_test_set")(lambda **_: None)
        assert torch.equal(load_dataset("tiny_test_set").train.images, images)
    finally:
        assert unregister_dataset("tiny_test_set") is _tiny
    assert "tiny_test_set" not in list_datasets()


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(DatasetError, match="digits"):
        load_dataset("mnist-typo")


def _data(n: int = 20) -> ImageData:
    imgs = torch.arange(n * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 3, 4, 4)
    return ImageData(imgs, torch.arange(n) % 2)


def test_loader_batches_are_reproducible_from_any_start() -> None:
    loader = TensorLoader(_data(), 4, (0.5,) * 3, (0.25,) * 3, train=True, pad=1, flip=True, seed=1)
    loader.set_epoch(3)
    full = list(loader)
    tail = list(loader.batches(start=2))
    assert len(full) == 5 and len(tail) == 3
    for (x1, y1), (x2, y2) in zip(full[2:], tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    loader.set_epoch(4)
    assert not torch.equal(next(iter(loader))[1], full[0][1]) or not torch.equal(next(iter(loader))[0], full[0][0])


def test_loader_ddp_shards_cover_the_global_batch() -> None:
    data = _data()
    one = TensorLoader(data, 4, (0.0,) * 3, (1.0,) * 3, train=True, seed=2)
    ranks = [TensorLoader(data, 4, (0.0,) * 3, (1.0,) * 3, train=True, seed=2, rank=r, world=2) for r in (0, 1)]
    for (_, y), (_, y0), (_, y1) in zip(one, *ranks, strict=True):
        assert torch.equal(y, torch.cat([y0, y1]))


def test_loader_augmentation_is_a_shifted_crop() -> None:
    data = _data(8)
    loader = TensorLoader(data, 8, (0.0,) * 3, (1 / 255,) * 3, train=True, pad=1, flip=False, seed=0)
    x, _ = next(iter(loader))
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    for img, idx in zip(x, order, strict=True):
        src = torch.nn.functional.pad(data.images[idx].float(), (1, 1, 1, 1))
        crops = [src[:, i:i + 4, j:j + 4] for i in range(3) for j in range(3)]
        assert any(torch.allclose(img, c) for c in crops)


def test_loader_rejects_tiny_train_set() -> None:
    with pytest.raises(DatasetError, match="batch-size"):
        TensorLoader(_data(3), 4, (0.0,) * 3, (1.0,) * 3, train=True)


def test_streamed_imagefolder_is_reproducible_and_worker_independent(tmp_path: Path) -> None:
    from foldattn.train.data import FileData, make_loader

    root = _tree(tmp_path / "t", {"a": 5, "b": 5, "c": 5}, size=(24, 20))
    b = load_dataset(f"imagefolder:{root}", val_split=3, image_size=16, stream=True)
    assert isinstance(b.train, FileData) and len(b.train) == 12 and len(b.val) == 3 and b.image_size == (16, 16)
    loader = make_loader(b.train, 4, b, train=True, seed=5)
    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == 3 and full[0][0].shape == (4, 3, 16, 16)
    tail = list(loader.batches(start=1))
    for (x1, y1), (x2, y2) in zip(full[1:], tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with_worker = make_loader(b.train, 4, b, train=True, seed=5, workers=1)
    with_worker.set_epoch(2)
    assert all(torch.equal(a[0], c[0]) for a, c in zip(full, with_worker, strict=True))
    val = list(make_loader(b.val, 4, b, train=False))
    assert sum(y.numel() for _, y in val) == 3


def test_stream_is_for_imagefolder_only() -> None:
    with pytest.raises(DatasetError, match="imagefolder"):
        load_dataset("digits", stream=True)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=6), frac=st.floats(0.05, 0.95), seed=st.integers(0, 9))
def test_stratified_split_properties(counts: list[int], frac: float, seed: int) -> None:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]
    n = labels.numel()
    if not 0 < round(frac * n) < n:
        with pytest.raises(DatasetError):
            stratified_split(labels, frac, seed)
        return
    tr, va = stratified_split(labels, frac, seed)
    assert va.numel() == round(frac * n) and torch.equal(torch.cat([tr, va]).sort().values, torch.arange(n))
    # per class, the held-out count is within one of the exact proportion
    for c, k in enumerate(counts):
        assert abs(int((labels[va] == c).sum()) - k * va.numel() / n) < 1 + 1e-9


@pytest.mark.parametrize("layout", ["val-split", "val-folder"])
def test_splits_are_not_listed_class_by_class(tmp_path: Path, layout: str) -> None:
    # a pass capped at the first N images (record_stripes, calibrate) must see every class
    if layout == "val-split":
        b = load_dataset(f"imagefolder:{_tree(tmp_path, {c: 10 for c in 'abcd'})}", val_split=8)
    else:
        _tree(tmp_path / "train", {c: 10 for c in "abcd"})
        _tree(tmp_path / "val", {c: 4 for c in "abcd"})
        b = load_dataset(f"imagefolder:{tmp_path}")
    for split in (b.train, b.val):
        assert len(set(split.labels[:8].tolist())) >= 3, split.labels.tolist()
    again = load_dataset(f"imagefolder:{tmp_path}", val_split=8 if layout == "val-split" else None)
    assert torch.equal(again.val.labels, b.val.labels)  # seeded: the same order every time


# ----------------------------------------------------------------------------- one training size per folder
def _solid(path: Path, size: tuple[int, int], value: int = 90) -> None:
    """A one-colour image of ``size = (width, height)``: large ones still encode and decode fast."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, value // 2)).save(path)


def _decoded(bundle: DataBundle) -> list[bytes]:
    return [x.numpy().tobytes() for x in torch.cat([bundle.train.images, bundle.val.images])]


# (id, the odd file: (width, height), its path ("!" sorts first); the only file of its size among 10 of 16x16)
ODD = [
    ("tiny-first", (1, 1), "a/!first.png"),
    ("tall-first", (7, 3000), "a/!first.png"),
    ("huge-png-first", (3000, 3000), "a/!first.png"),
    ("huge-jpeg", (3000, 3000), "b/2x.jpg"),
]


@pytest.mark.parametrize(("case", "odd", "name"), ODD, ids=[c[0] for c in ODD])
def test_an_odd_file_does_not_set_the_size(tmp_path: Path, case: str, odd: tuple[int, int], name: str) -> None:
    root = _tree(tmp_path / "t", {"a": 5, "b": 5}, size=(16, 16))
    _solid(root / name, odd)
    if case.endswith("-first"):
        from foldattn.train.data import _scan

        assert _scan(root)[1][0][0] == root / name  # the file the old loader took its size from
    b = load_dataset(f"imagefolder:{root}", val_split=2)
    assert b.image_size == (16, 16) and len(b.train) + len(b.val) == 11
    w, h = odd
    assert b.notes["mixed sizes"] == f"images of 2 sizes (16x16: 10; {w}x{h}: 1) resized to 16x16"
    assert "median of 11 sampled files" in b.notes["image size"]
    # the files already at the size are kept pixel for pixel
    decoded = set(_decoded(b))
    for f in sorted((root / "a").glob("[0-9].png")) + sorted((root / "b").glob("[0-9].png")):
        assert numpy.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1).tobytes() in decoded
    assert ("aspect ratios" in b.notes) == (case == "tall-first")
    if case == "tall-first":
        assert "1 image(s)" in b.notes["aspect ratios"] and "7x3000" in b.notes["aspect ratios"]


@pytest.mark.parametrize(("size", "expected"), [(None, (16, 16)), (12, (12, 12)), (40, (40, 40))],
                         ids=["sampled", "smaller", "larger"])
def test_the_image_size_given_wins_over_the_sample(tmp_path: Path, size: int | None,
                                                   expected: tuple[int, int]) -> None:
    root = _tree(tmp_path / "t", {"a": 3, "b": 3}, size=(16, 16))
    _solid(root / "a" / "!first.png", (1, 1))
    b = load_dataset(f"imagefolder:{root}", val_split=2, image_size=size)
    assert b.image_size == expected and b.train.images.shape[2:] == expected
    assert ("the image size given" in b.notes["image size"]) == (size is not None)


@pytest.mark.parametrize(("size", "shown"), [((2, 2), "2x2"), ((7, 40), "7x40"), ((1100, 1100), "1100x1100")],
                         ids=["tiny", "thin", "large"])
def test_a_sampled_size_out_of_range_needs_image_size(tmp_path: Path, size: tuple[int, int], shown: str) -> None:
    root = tmp_path / "t"
    for c in "ab":
        for i in range(3):
            _solid(root / c / f"{i}.png", size, value=40 * i)
    with pytest.raises(DatasetError, match=rf"{shown} pixels .*--image-size N") as info:
        load_dataset(f"imagefolder:{root}", val_split=2)
    assert str(root) in str(info.value) and len(str(info.value).splitlines()) == 1
    assert load_dataset(f"imagefolder:{root}", val_split=2, image_size=8).image_size == (8, 8)


def test_the_sample_reads_headers_spread_over_all_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from foldattn.train import data

    # 3 classes of 40 files: 64 of 120 are sampled, from every class, and only their headers
    root = tmp_path / "t"
    for c in "abc":
        for i in range(40):
            (root / c).mkdir(parents=True, exist_ok=True)
            (root / c / f"{i:02d}.png").write_bytes(b"")
    seen: list[Path] = []
    monkeypatch.setattr(data, "read_size", lambda p: seen.append(p) or (20, 10))
    assert data._sampled_size(root, data._scan(root)[1]) == (10, 20)
    assert len(seen) == data.SAMPLE_FILES == len(set(seen)) and {p.parent.name for p in seen} == set("abc")


def test_a_cache_at_another_size_is_not_reused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", {"a": 3, "b": 3}, size=(16, 16))
    cache = tmp_path / "cache"
    assert load_dataset(f"imagefolder:{root}", val_split=2, cache_dir=cache).image_size == (16, 16)
    (at16,) = cache.glob("*.pt")
    at12 = load_dataset(f"imagefolder:{root}", val_split=2, cache_dir=cache, image_size=12)
    assert at12.image_size == (12, 12) and len(list(cache.glob("*.pt"))) == 2
    # a 16x16 tensor under the 12x12 name (a crafted or mixed-up file) is rebuilt, not served
    (at12_file,) = set(cache.glob("*.pt")) - {at16}
    at12_file.write_bytes(at16.read_bytes())
    again = load_dataset(f"imagefolder:{root}", val_split=2, cache_dir=cache, image_size=12)
    assert again.image_size == (12, 12) and torch.equal(again.train.images, at12.train.images)
    # and a cache hit keeps the notes on the files' sizes
    _solid(root / "a" / "!first.png", (1, 1))
    first = load_dataset(f"imagefolder:{root}", val_split=2, cache_dir=cache)
    hit = load_dataset(f"imagefolder:{root}", val_split=2, cache_dir=cache)
    assert hit.notes == first.notes and "1x1: 1" in hit.notes["mixed sizes"]


def test_a_tensor_too_large_for_memory_is_refused_before_decoding(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from foldattn.train import data

    root = _tree(tmp_path / "t", {"a": 3, "b": 3}, size=(16, 16))
    monkeypatch.setattr(data, "_memory_bytes", lambda: 3 * 6 * 3 * 16 * 16)  # a third: exactly the tensor at 16
    assert load_dataset(f"imagefolder:{root}", val_split=2).image_size == (16, 16)
    monkeypatch.setattr(data, "_decode", lambda *a: pytest.fail("decoded before the memory check"))
    with pytest.raises(DatasetError, match=r"6 images .* at 17x17 .*--stream.*smaller --image-size") as info:
        load_dataset(f"imagefolder:{root}", val_split=2, image_size=17)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("size", [0, -3, 2.5, True], ids=["zero", "negative", "fraction", "bool"])
def test_a_bad_image_size_is_refused(tmp_path: Path, size: object) -> None:
    root = _tree(tmp_path / "t", {"a": 3, "b": 3})
    with pytest.raises(DatasetError, match="--image-size N"):
        load_dataset(f"imagefolder:{root}", val_split=2, image_size=size)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [None, 32], ids=["sampled", "given"])
def test_a_uniform_jpeg_tree_loads_unchanged(tmp_path: Path, size: int | None) -> None:
    # the CIFAR-10 JPEG archive's shape: PATH/train/<class>/*.jpg, all 32x32
    root = _tree(tmp_path / "train", {"cat": 4, "dog": 4}, size=(32, 32))
    for f in list(root.rglob("*.png")):
        Image.open(f).save(f.with_suffix(".jpg"), quality=90)
        f.unlink()
    b = load_dataset(f"imagefolder:{tmp_path}", val_split=2, image_size=size)
    assert b.image_size == (32, 32) and "mixed sizes" not in b.notes and "aspect ratios" not in b.notes
    expected = {numpy.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1).tobytes() for f in root.rglob("*.jpg")}
    assert set(_decoded(b)) == expected


def test_streaming_does_not_take_the_first_files_size(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", {"a": 3, "b": 3}, size=(40, 40))
    _solid(root / "a" / "!first.png", (9, 9))
    assert load_dataset(f"imagefolder:{root}", val_split=2, stream=True).image_size == (224, 224)


# (id, files' sizes as {(width, height): count}, the training (height, width), the expected notes past "image size")
SIZE_NOTES = [
    ("uniform", {(32, 32): 9}, (32, 32), {}),
    ("one-other-size", {(12, 10): 8}, (8, 8), {"mixed sizes": "images of 1 size (12x10: 8) resized to 8x8"}),
    ("many-sizes", {(8 + i, 8): 1 for i in range(8)} | {(8, 8): 5}, (8, 8),
     {"mixed sizes": "images of 8 sizes (8x8: 5; 9x8: 1; 10x8: 1; 11x8: 1; 12x8: 1; 13x8: 1; 2 more sizes) resized "
                     "to 8x8"}),
    ("elongated", {(16, 16): 4, (64, 16): 2, (16, 30): 1}, (16, 16),  # 16x30 keeps 53%: not counted
     {"mixed sizes": "images of 3 sizes (16x16: 4; 64x16: 2; 16x30: 1) resized to 16x16",
      "aspect ratios": "2 image(s) lose more than half their area to the centre crop (the most elongated: 64x16, "
                       "25.0% kept)"}),
]


@pytest.mark.parametrize(("case", "sizes", "size", "expected"), SIZE_NOTES, ids=[c[0] for c in SIZE_NOTES])
def test_size_notes(case: str, sizes: dict[tuple[int, int], int], size: tuple[int, int],
                    expected: dict[str, str]) -> None:
    from collections import Counter

    from foldattn.train.data import _size_notes

    notes = _size_notes(Counter(sizes), size, "how")
    assert notes.pop("image size") == f"{size[1]}x{size[0]} (width x height; how)"
    assert notes == expected
