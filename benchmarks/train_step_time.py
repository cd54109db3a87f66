"""Training-step time of plain, +SE, +ASR(SE) and +ASR(SE)+SE CIFAR ResNets, measured interleaved.

Wall-clock epoch times of long runs on a shared machine mostly measure the load of the
moment; this script alternates the variants step by step in one process so that they see
the same load, and reports the median time of a forward + backward + SGD step
(bf16 autocast, channels_last, as ``foldattn train`` runs on CPU).

    python benchmarks/train_step_time.py --model cifar_resnet20 --batch-size 128 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from foldattn.models import create_model

VARIANTS = {"plain": {}, "+SE": {"attention": "se"}, "+ASR(SE)": {"attention": "se", "asr": True},
            "+ASR(SE)+SE": {"attention": "se", "asr": True, "both": True}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    setups = {}
    for name, kw in VARIANTS.items():
        model = create_model(args.model, **kw).to(memory_format=torch.channels_last).train()
        setups[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for r in range(args.rounds + 1):
        for name, (model, opt) in setups.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.threads} thread(s), "
          f"median of {args.rounds} interleaved steps")
    print("| variant | ms / step | vs plain |\n|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {1000 * m:.0f} | {m / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
