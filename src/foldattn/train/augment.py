"""The modern-recipe augmentations of ``foldattn train``, taken from timm (and one from torchvision).

* ``--aa SPEC``: an image policy as timm's ``train.py`` spells it -- RandAugment
  (Cubuk et al. 2020, ``rand-m9-mstd0.5-inc1``), AutoAugment (Cubuk et al. 2019, ``v0``,
  ``v0r``, ``original``, ``originalr``, ``3a``), AugMix (Hendrycks et al. 2020,
  ``augmix-m5-w4-d2``) -- or ``trivialaugment`` (Mueller & Hutter 2021, torchvision's
  ``TrivialAugmentWide``, which timm does not have).
* ``--reprob P``: random erasing (Zhong et al. 2020), timm's ``RandomErasing`` on the
  normalised batch.
* ``--mixup A``, ``--cutmix A``: timm's ``Mixup`` (Zhang et al. 2018; Yun et al. 2019) with
  its soft targets and ``SoftTargetCrossEntropy``.

These implementations draw from Python's ``random`` and NumPy's global generators.
:func:`seeded` runs them under a generator state derived from (seed, epoch, batch) and puts
the callers' states back afterwards, so a batch is the same whether or not the run was
resumed before it, and nothing outside the call sees a changed generator.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._utils import require

__all__ = ["check_aa", "image_policy", "BatchPolicy", "random_erasing", "create_mixup", "seeded"]

TRIVIAL = ("trivialaugment", "ta_wide")
_AUTO = ("v0", "v0r", "original", "originalr", "3a")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with Python's ``random``, NumPy's and torch's CPU generators seeded by
    ``seed``; every previous state is restored on exit."""
    seed %= 2**63
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def check_aa(spec: str) -> None:
    """Refuse a ``--aa`` spec timm (or torchvision, for ``trivialaugment``) cannot build (``ValueError``)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--aa {spec!r}: name a policy, e.g. rand-m9-mstd0.5-inc1, v0, augmix-m5-w4-d2, "
                         "trivialaugment")
    head, *sections = spec.split("-")
    if head in ("rand", "augmix"):  # timm skips sections it does not recognise; refuse them here
        for sec in sections:
            if not (re.fullmatch(r"[a-z]+\d+(\.\d+)?", sec) or (head == "rand" and sec.startswith("t"))):
                raise ValueError(f"--aa {spec!r}: section {sec!r} is not NAME+NUMBER (e.g. m9, n2, mstd0.5, inc1)")
    try:
        image_policy(spec, 32, (0.5, 0.5, 0.5))
    except (ValueError, ImportError):
        raise
    except Exception as e:  # timm's parsers raise AssertionError/KeyError on a malformed spec
        raise ValueError(f"--aa {spec!r}: not a policy timm can parse ({type(e).__name__}: {e}); use rand-mM[-nN]"
                         "[-mstdS][-incI], augmix-mM-wW-dD, v0, v0r, original, originalr, 3a or trivialaugment") \
            from None


def image_policy(spec: str, image_size: int, mean: tuple[float, ...]) -> Callable[[Any], Any]:
    """The PIL-image transform of ``--aa spec`` for images of side ``image_size`` (fill: ``mean``)."""
    if spec in TRIVIAL:
        from torchvision.transforms import v2

        return v2.TrivialAugmentWide()
    aa = require("timm.data.auto_augment", "train")
    # the hyper-parameters timm's create_transform passes for an image of this size
    hparams = {"translate_const": int(image_size * 0.45),
               "img_mean": tuple(min(255, round(255 * m)) for m in (tuple(mean) * 3)[:3])}
    if spec.startswith("rand"):
        policy = aa.rand_augment_transform(spec, hparams)
    elif spec.startswith("augmix"):
        policy = aa.augment_and_mix_transform(spec, {**hparams, "translate_pct": 0.3})
    elif spec.split("-")[0] in _AUTO:
        policy = aa.auto_augment_transform(spec, hparams)
    else:
        raise ValueError(f"--aa {spec!r}: unknown policy; use rand-m9-mstd0.5-inc1 (RandAugment), v0/original "
                         "(AutoAugment), augmix-m5-w4-d2 (AugMix) or trivialaugment")
    _keep_zero_bit_posterize(policy, aa)
    return policy


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # what Pillow < 13 returned for 0 bits: every pixel 0
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _keep_zero_bit_posterize(policy: Any, aa: Any) -> None:
    """timm's policies ask for a 0-bit Posterize at some magnitudes (RandAugment ``inc1`` at m >= 10,
    AutoAugment ``v0``), which Pillow 13 refuses ("bits must be between ... 1 and 8"). Give the
    ops of *this* policy object a posterize with Pillow's former result; timm itself is not touched."""
    ops = list(getattr(policy, "ops", []))
    for sub in getattr(policy, "policy", []):  # AutoAugment: sub-policies of ops
        ops.extend(sub)
    for op in ops:
        if getattr(op, "aug_fn", None) is aa.posterize:
            op.aug_fn = _posterize


class BatchPolicy:
    """Apply a PIL image policy to every image of a ``uint8`` batch ``(N, C, H, W)`` (grey images
    are expanded to RGB for the policy and reduced back)."""

    def __init__(self, spec: str, image_size: int, mean: tuple[float, ...]) -> None:
        self.spec = spec
        self.policy = image_policy(spec, image_size, mean)

    def __call__(self, x: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        out = torch.empty_like(x)
        grey = x.shape[1] == 1
        for i in range(x.shape[0]):
            img = x[i].expand(3, -1, -1) if grey else x[i]
            y = TF.pil_to_tensor(self.policy(TF.to_pil_image(img.contiguous())))
            out[i] = y[:1] if grey else y
        return out


def random_erasing(prob: float) -> Callable[[Tensor], Tensor]:
    """timm's ``RandomErasing`` (per-pixel normal noise, one box), for normalised batches or images."""
    erasing = require("timm.data.random_erasing", "train")
    return erasing.RandomErasing(probability=prob, mode="pixel", device="cpu")


def create_mixup(mixup: float, cutmix: float, prob: float, switch_prob: float, label_smoothing: float,
                 num_classes: int) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """timm's ``Mixup`` (batch mode) for these alphas, or None if both are 0."""
    if mixup <= 0 and cutmix <= 0:
        return None
    timm_data = require("timm.data", "train")
    return timm_data.Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode="batch",
                           label_smoothing=label_smoothing, num_classes=num_classes)
