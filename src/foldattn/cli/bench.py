"""``foldattn bench``: plain, +X, +ASR(X) and the folded forms side by side (see :mod:`foldattn.bench`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace

from .. import attention as _attention
from .._argtypes import MAX_BATCH, MAX_REPS, MAX_SEED, MAX_THREADS, bounded_int
from .._utils import check_output_folder
from ..bench import QUICK, BenchConfig, families, render_markdown, run_bench, write_outputs
from ..bench.targets import _profile_failures
from ..bench.timing import _CLOCKS

__all__ = ["register"]


def _runtimes(text: str) -> list[str]:
    from ..bench import RUNTIMES

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n != "eager" and n not in RUNTIMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown runtime(s) {', '.join(bad) or repr(text)}; valid: eager, "
                                         f"{', '.join(RUNTIMES)}")
    return names


def _command_line(args: argparse.Namespace) -> str:
    """The options given, as one reproducible ``foldattn bench ...`` line."""
    parts = ["foldattn", "bench"]
    for action in args.bench_actions:
        value = getattr(args, action.dest, None)
        if value is None or value is False or (action.dest == "out" and value == action.default):
            continue
        flag = action.option_strings[-1]
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(value)] if action.dest == "runtime" else [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _main(args: argparse.Namespace) -> int:
    base = QUICK if args.quick else BenchConfig()
    overrides = {k: getattr(args, k) for k in (
        "latency_batch", "throughput_batch", "train_batch", "reps", "warmup", "threads", "device", "clock", "seed")
        if getattr(args, k) is not None}
    if args.models:
        overrides["models"] = tuple(args.models)
    if args.attentions:
        overrides["attentions"] = tuple(args.attentions)
    overrides.update(channels_last=args.channels_last or base.channels_last, onnx=args.onnx or base.onnx,
                     memory=base.memory and not args.no_memory, train=base.train and not args.no_train,
                     runtimes=tuple(args.runtime or ()))
    cfg = replace(base, **overrides).validated()
    check_output_folder(args.out, "--out")
    command = _command_line(args)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    result = run_bench(cfg, log=log, command=command)
    if args.profile_failures:
        _profile_failures(result, cfg, log)
    json_path, md_path = write_outputs(result, args.out)
    print(render_markdown(result))
    print(f"wrote {json_path} and {md_path}")
    failed = [t for t in result["targets"] if not t["passed"]]
    return 1 if failed and args.strict else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` sub-command."""
    p = sub.add_parser(
        "bench",
        help="cost of plain / +X / ASR(X) / folded forms side by side (latency, throughput, memory, training)",
        description="Interleaved, median-of-N benchmark of plain, +X, +ASR(X) (training form), folded, "
                    "folded+fuse_bn and ASR(X)+X folded, with ratios to plain and PASS/FAIL target lines.",
    )
    p.add_argument("--quick", action="store_true",
                   help="CI size: cifar_resnet20, SE and ECA, 3 samples (other options override it)")
    p.add_argument("--models", nargs="+", metavar="MODEL", help=f"default: cifar_resnet164 resnet50; "
                   f"any of {', '.join(families())}, or timm:NAME / torchvision:NAME (untrained, attention "
                   "placed by foldattn.attach)")
    p.add_argument("--attentions", nargs="+", metavar="X",
                   help="default: all of "
                        f"{', '.join(a for a in _attention.names() if _attention.get(a).has_classic_form)}")
    batch = bounded_int(1, MAX_BATCH)
    limits = (f"at most {MAX_BATCH}; the inputs' and activations' memory is estimated before anything is "
              "allocated, and refused past min(16 GiB, half the machine's memory or 90%% of the GPU's)")
    p.add_argument("--latency-batch", type=batch, help=f"batch of the latency figure ({limits}; default 1)")
    p.add_argument("--throughput-batch", type=batch, help=f"batch of the throughput figure ({limits}; default 64)")
    p.add_argument("--train-batch", type=batch, help=f"batch of the training step ({limits}; default per model)")
    p.add_argument("--reps", type=bounded_int(1, MAX_REPS), help=f"timed samples per variant (at most {MAX_REPS}; "
                                                                  "default 7)")
    p.add_argument("--warmup", type=bounded_int(0, MAX_REPS),
                   help=f"untimed rounds first (at most {MAX_REPS}; default 2; at least 1 is run)")
    p.add_argument("--threads", type=bounded_int(1, MAX_THREADS),
                   help=f"CPU threads (at most {MAX_THREADS}: 4 per CPU core, 256 at most; default 1 on CPU: the "
                        "steadiest figures; torch's default with CUDA)")
    p.add_argument("--device", help="cpu (default) or cuda[:N]")
    p.add_argument("--clock", choices=sorted(_CLOCKS),
                   help="cpu: CPU time of the process, steadier on a shared machine (the default with one CPU "
                        "thread); cuda: CUDA-event time, the GPU's own (the default with --device cuda); wall: "
                        "elapsed time (the default otherwise)")
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    p.add_argument("--onnx", action="store_true", help="add ONNX Runtime rows (same as --runtime eager,ort)")
    p.add_argument("--runtime", type=_runtimes, metavar="R[,R...]",
                   help="time the deployed plain, +X and ASR-folded models in these runtimes too: eager (always), "
                        "ort (ONNX Runtime), ort-int8 (its INT8 model, per-channel), compile (torch.compile), openvino "
                        "(OpenVINO's CPU plugin in f32; extra foldattn[openvino]), openvino-int8 (quantized by NNCF), "
                        "executorch (ExecuTorch with XNNPACK; extra foldattn[executorch]), executorch-int8 "
                        "(quantized by the PT2E flow with the XNNPACK quantizer); INT8 rows are per-channel, "
                        "calibrated on random inputs: a cost figure, not an accuracy one")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--seed", type=bounded_int(0, MAX_SEED), help=f"seed of weights and inputs (0 to {MAX_SEED}; "
                                                                     "default 0)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.md (default runs/bench)")
    p.add_argument("--profile-failures", action="store_true",
                   help="profile (torch.profiler) plain and the variant of each missed target; tables go "
                        "into bench.md and bench.json")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    # the options, so that the report can print the command that made it
    p.set_defaults(func=_main, bench_actions=[a for a in p._actions if a.option_strings and a.dest != "help"])
