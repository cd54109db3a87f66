"""foldattn's plain network against the same network written the usual way, process by process.

``foldattn bench`` times the ``reference`` rows in one process. A difference of a few per
cent there can be the process rather than the code: the order in which buffers are freed
decides which the allocator hands out next, and that varies with what else the process
built. This script repeats the comparison in ``--processes`` fresh processes. Each one
builds the models of ``foldattn.bench``'s family for ``--model``. Those are plain and its
reference, plus a deep copy of each to show what the process alone does. The
re-parameterization backbones add their deployed network and its reference. The script times
``--rounds`` forward passes of each at ``--batch`` in a shuffled order, by the thread's CPU
time, on one thread (with ``--train``: training steps, forward, loss and backward, of the
training forms). It prints, per process, the median ms of each and each reference's
ratio (ours / reference: above 1 means the reference is faster).

    python benchmarks/reference_ab.py --model cifar_vit_tiny --processes 8
    python benchmarks/reference_ab.py --model cifar_resnet20_dbb --batch 64 --processes 4
    python benchmarks/reference_ab.py --model cifar_resnet20_dbb --train --rounds 10 --processes 4
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import subprocess
import sys
import time


def _one(model: str, batch: int, rounds: int, seed: int, train: bool = False) -> dict[str, float]:
    import torch

    from foldattn.bench.family import get_family
    from foldattn.srp import reparameterize

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    family = get_family(model)
    if family.reference is None:
        raise SystemExit(f"{model} has no reference implementation in foldattn.bench")
    plain = family.build(None, False, False).eval()
    models = {"ours": plain, "reference": family.reference(plain).eval()}
    if family.reference_deployed is not None and not train:  # deployed forms are not trained
        models["ours deployed"] = reparameterize(plain).eval()
        models["reference deployed"] = family.reference_deployed(plain).eval()
    for key in list(models):
        models[f"{key} (copy)"] = copy.deepcopy(models[key])
    x = torch.randn(batch, *family.input_size)
    target = torch.randint(0, 10, (batch,))

    def step(m: torch.nn.Module) -> None:
        if train:  # one training step without the optimizer (its update costs the same for both)
            m.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), target).backward()
        else:
            m(x)

    times: dict[str, list[float]] = {k: [] for k in models}
    rng = random.Random(seed)
    with torch.inference_mode(not train):
        for m in models.values():
            m.train(train)
            for _ in range(2):
                step(m)
        for _ in range(rounds):
            order = list(models)
            rng.shuffle(order)
            for key in order:
                t0 = time.thread_time()
                step(models[key])
                times[key].append((time.thread_time() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar_vit_tiny", help="a foldattn model with a bench reference")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=25, help="timed forwards of each model per process")
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--train", action="store_true",
                   help="time a training step (forward, cross-entropy, backward) of the training forms instead")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "rounds", "processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.worker is not None:
        print(json.dumps(_one(args.model, args.batch, args.rounds, args.worker, args.train)))
        return 0
    what = "training steps" if args.train else "forwards"
    print(f"{args.model}, batch {args.batch}, {args.rounds} {what} per process and model, 1 thread, thread CPU time")
    ratios: dict[str, list[float]] = {}
    for i in range(args.processes):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
                              "--rounds", str(args.rounds), "--worker", str(i), *(["--train"] if args.train else [])],
                             capture_output=True, text=True, check=True)
        med = json.loads(out.stdout.strip().splitlines()[-1])
        pairs = [("ours", "reference")] + ([("ours deployed", "reference deployed")] if "ours deployed" in med else [])
        parts = []
        for ours, ref in pairs:
            r = med[ours] / med[ref]
            ratios.setdefault(ref, []).append(r)
            parts.append(f"{ours} {med[ours]:.2f} ms, {ref} {med[ref]:.2f} ms, ratio {r:.3f}")
        copies = ", ".join(f"{k} {v:.2f}" for k, v in med.items() if k.endswith("(copy)"))
        print(f"process {i}: " + "; ".join(parts) + f"  [copies: {copies}]")
    for ref, rs in ratios.items():
        print(f"{ref}: ratio median {statistics.median(rs):.3f}, range {min(rs):.3f}-{max(rs):.3f} "
              f"over {len(rs)} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
