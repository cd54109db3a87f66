"""The deployed form of timm's re-parameterizable models: foldattn's fold against timm's own.

For each family (RepVGG, MobileOne, RepViT, FastViT, RepGhost; random weights, 10 classes), plain
and with ASR(SE) attached (``foldattn.attach``: one ASR per sum of parallel branches in RepVGG and
MobileOne, on residual branches elsewhere), compares ``timm.utils.reparameterize_model`` of the
plain model with ``foldattn.fold(model, fuse_bn=True)``: parameters, norm layers left, the largest
relative output error against the training form (float32), and batch-1 latency in eager PyTorch
(one thread, CPU-time clock, interleaved median of ``--reps`` samples: steady on a shared machine).

    python benchmarks/reparam_timm.py --out runs/reparam-timm
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import foldattn
from foldattn._utils import atomic_path, require, strict_json
from foldattn.bench.timing import interleaved

FAMILIES = ["repvgg_a0", "mobileone_s0", "repvit_m0_9", "fastvit_t8", "repghostnet_050"]


def _norms(m: nn.Module) -> int:
    return sum(isinstance(x, _BatchNorm) or type(x).__name__ in ("BatchNormAct2d", "FrozenBatchNorm2d")
               for x in m.modules())


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--families", nargs="+", default=FAMILIES)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    timm = require("timm", "timm")
    from timm.utils.model import reparameterize_model

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    command = "python benchmarks/reparam_timm.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in args.families:
        torch.manual_seed(0)
        plain = timm.create_model(name, num_classes=10).eval()
        with torch.no_grad():  # trained-looking norms: statistics away from 0 / 1
            for m in plain.modules():
                if isinstance(m, _BatchNorm) and m.running_mean is not None:
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        theirs = reparameterize_model(plain)
        attached = foldattn.attach(plain, "se").eval()
        with torch.no_grad():
            for n, prm in attached.named_parameters():
                if n.endswith("psi"):
                    prm.normal_(0, 1)
        ours_plain = foldattn.fold(plain, fuse_bn=True)
        ours_asr = foldattn.fold(attached, fuse_bn=True)
        with torch.inference_mode():
            ref_plain, ref_asr = plain(x), attached(x)
            errors = {
                "timm": ((theirs(x) - ref_plain).abs().max() / ref_plain.abs().max()).item(),
                "plain": ((ours_plain(x) - ref_plain).abs().max() / ref_plain.abs().max()).item(),
                "asr": ((ours_asr(x) - ref_asr).abs().max() / ref_asr.abs().max()).item(),
            }
            runners = {k: (lambda m=m: m(x)) for k, m in (("timm", theirs), ("plain", ours_plain), ("asr", ours_asr))}
            samples = interleaved(runners, args.reps, 2, min_sample_s=0.2, clock=time.process_time)
        ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        rows.append({"family": name, "timm": {"params": _params(theirs), "norms": _norms(theirs), "ms": ms["timm"],
                                              "rel_error": errors["timm"]},
                     "plain": {"params": _params(ours_plain), "norms": _norms(ours_plain), "ms": ms["plain"],
                               "rel_error": errors["plain"]},
                     "asr": {"params": _params(ours_asr), "norms": _norms(ours_asr), "ms": ms["asr"],
                             "rel_error": errors["asr"], "asr_sites": sum(
                                 isinstance(m, foldattn.ASR) for m in attached.modules())}})
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "reparam_timm.json") as tmp:
        tmp.write_text(strict_json({"command": command, "rows": rows}, indent=1) + "\n")
    lines = [f"Command: `{command}` (input {args.size}x{args.size}, batch 1, one thread, CPU-time clock)", "",
             "| model | timm reparameterize_model: params / norms / ms | foldattn fold(fuse_bn=True), plain | "
             "foldattn, +ASR(SE) attached (sites) | max rel. error timm / plain / ASR |", "|---|---|---|---|---|"]
    for r in rows:
        t, a, b = r["timm"], r["plain"], r["asr"]
        lines.append(f"| {r['family']} | {t['params'] / 1e6:.3f} M / {t['norms']} / {t['ms']:.1f} | "
                     f"{a['params'] / 1e6:.3f} M / {a['norms']} / {a['ms']:.1f} | "
                     f"{b['params'] / 1e6:.3f} M / {b['norms']} / {b['ms']:.1f} ({b['asr_sites']}) | "
                     f"{t['rel_error']:.1e} / {a['rel_error']:.1e} / {b['rel_error']:.1e} |")
    with atomic_path(args.out / "reparam_timm.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
