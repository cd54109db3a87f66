"""timm's augmentations as foldattn's loaders apply them: seeded per batch, nothing else disturbed."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from foldattn.train.augment import BatchPolicy, check_aa, create_mixup, random_erasing, seeded
from foldattn.train.data import load_dataset, make_loader

DIGITS = load_dataset("digits")
SPECS = ["rand-m9-mstd0.5-inc1", "rand-n3-m15", "v0", "original", "3a", "augmix-m5-w4-d2", "trivialaugment"]


def test_seeded_restores_every_generator() -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with seeded(123):
        inside = (random.random(), np.random.rand(), torch.rand(1).item())
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    with seeded(123):
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == inside


@pytest.mark.parametrize("spec", SPECS)
def test_every_policy_changes_images_reproducibly(spec: str) -> None:
    x = DIGITS.train.images[:32]
    policy = BatchPolicy(spec, 16, DIGITS.mean)
    with seeded(7):
        a = policy(x)
    with seeded(7):
        b = policy(x)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


def test_zero_bit_posterize_is_black_not_an_error() -> None:
    # RandAugment's increasing posterize keeps 0 bits at magnitude >= 10: Pillow 13 refuses that
    policy = BatchPolicy("rand-n1-m10-inc1", 16, DIGITS.mean)
    with seeded(0):
        for _ in range(5):
            policy(DIGITS.train.images[:64])


@pytest.mark.parametrize("spec", ["nonsense", "rand-mX", "augmix-q", "rand-m9-zz1", "v9", ""])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="--aa"):
        check_aa(spec)


def test_random_erasing_erases_some_images() -> None:
    x = torch.zeros(64, 3, 16, 16)
    with seeded(0):
        y = random_erasing(0.5)(x.clone())
    erased = (y.flatten(1) != 0).any(1)
    assert 10 < int(erased.sum()) < 54  # about half


def test_mixup_gives_soft_targets_that_sum_to_one() -> None:
    mix = create_mixup(0.8, 1.0, 1.0, 0.5, 0.1, 10)
    assert mix is not None and create_mixup(0.0, 0.0, 1.0, 0.5, 0.0, 10) is None
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    with seeded(0):
        xm, t = mix(x.clone(), y)
    assert t.shape == (8, 10) and torch.allclose(t.sum(1), torch.ones(8))
    assert not torch.equal(xm, x)


@pytest.mark.parametrize("opts", [{"aa": "rand-m9-mstd0.5-inc1"}, {"reprob": 0.5}, {"aa": "v0", "reprob": 0.25}])
def test_training_loader_batches_do_not_depend_on_the_batches_before(opts: dict) -> None:
    loader = make_loader(DIGITS.train, 32, DIGITS, train=True, seed=3, **opts)
    plain = make_loader(DIGITS.train, 32, DIGITS, train=True, seed=3)
    loader.set_epoch(1)
    plain.set_epoch(1)
    all_batches = [x for x, _ in loader.batches()]
    from_third = next(iter(loader.batches(2)))[0]
    assert torch.equal(all_batches[2], from_third)  # what an exact mid-epoch resume needs
    assert not torch.equal(all_batches[2], next(iter(plain.batches(2)))[0])


def test_validation_loaders_are_never_augmented() -> None:
    a = make_loader(DIGITS.val, 32, DIGITS, train=False, aa="v0", reprob=1.0)
    b = make_loader(DIGITS.val, 32, DIGITS, train=False)
    assert torch.equal(next(iter(a))[0], next(iter(b))[0])


def test_streamed_loader_applies_the_policy(tmp_path) -> None:
    from PIL import Image

    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        (tmp_path / "val" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            im = Image.fromarray((np.random.default_rng(i + 10 * c).random((20, 20, 3)) * 255).astype("uint8"))
            im.save(tmp_path / "train" / f"c{c}" / f"{i}.png")
            im.save(tmp_path / "val" / f"c{c}" / f"{i}.png")
    bundle = load_dataset(f"imagefolder:{tmp_path}", stream=True, image_size=16)
    bundle = dataclasses.replace(bundle)
    a = make_loader(bundle.train, 8, bundle, train=True, aa="rand-m9-mstd0.5-inc1", reprob=0.5)
    b = make_loader(bundle.train, 8, bundle, train=True)
    xa, xb = next(iter(a))[0], next(iter(b))[0]
    assert xa.shape == xb.shape == (8, 3, 16, 16)
    assert not torch.equal(xa, xb)
    assert torch.equal(xa, next(iter(a))[0])  # seeded per image
