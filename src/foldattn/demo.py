"""``foldattn demo``: build, train briefly, fold and verify plain, +SE and +ASR(SE) CIFAR ResNets."""

from __future__ import annotations

import argparse
import time

import torch

from .fold import fold
from .models import create_model
from .summary import count_params
from .verify import verify

__all__ = ["run_demo", "register"]


def run_demo(steps: int = 20, batch: int = 32, seed: int = 0) -> list[dict[str, object]]:
    """Train each variant a few steps on random data, fold, verify; return one row per variant."""
    torch.manual_seed(seed)
    rows = []
    for label, kw in (("plain", {}), ("+SE", {"attention": "se"}), ("+ASR(SE)", {"attention": "se", "asr": True})):
        model = create_model("cifar_resnet20", num_classes=10, **kw)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        deployed = fold(model) if kw.get("asr") else model
        report = verify(model, deployed, x[:4])
        deployed.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(10):
                deployed(x[:1])
            ms = (time.perf_counter() - t0) * 100
        rows.append({"model": label, "loss": loss.item(), "params_train": count_params(model),
                     "params_deployed": count_params(deployed), "latency_ms": ms, "verify": str(report)})
    return rows


def _main(args: argparse.Namespace) -> int:
    rows = run_demo(steps=3 if args.quick else 20)
    print(f"{'model':<10} {'loss':>7} {'params (train)':>15} {'params (deployed)':>18} {'latency b=1':>12}")
    for r in rows:
        print(f"{r['model']:<10} {r['loss']:>7.3f} {r['params_train']:>15,} {r['params_deployed']:>18,} "
              f"{r['latency_ms']:>9.2f} ms")
    print("\n".join(f"verify {r['model']}: {r['verify']}" for r in rows))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train plain, +SE and +ASR(SE), fold, verify, print a table")
    p.add_argument("--quick", action="store_true", help="a few steps only (CI)")
    p.set_defaults(func=_main)
