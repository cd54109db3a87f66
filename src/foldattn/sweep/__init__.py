"""Ablation sweeps: arms (sets of ``foldattn train`` options) x seeds, resumable, summarised with paired
differences to a baseline arm (``foldattn sweep FILE.yaml -o DIR``); the runs execute on this machine (its CPU
or its GPUs), on a Ray cluster or as SLURM jobs (:mod:`foldattn.sweep.launchers`).

>>> from foldattn.sweep import load_sweep, run_sweep, write_summary
>>> spec = load_sweep("benchmarks/sweeps/digits.yaml")
"""

from .launchers import LAUNCHERS, Launcher, LocalLauncher, RayLauncher, SlurmLauncher
from .runner import SweepResult, command_for, make_task, prepare_folder, run_state, run_sweep
from .spec import Arm, Run, SweepError, SweepSpec, load_sweep, parse_sweep
from .summary import markdown, plot_curves, plot_summary, stats, summarize, write_summary

__all__ = [
    "Arm", "Run", "SweepSpec", "SweepError", "SweepResult", "load_sweep", "parse_sweep", "run_sweep", "run_state",
    "prepare_folder", "command_for", "summarize", "write_summary", "markdown", "stats", "plot_summary", "plot_curves",
    "make_task", "Launcher", "LocalLauncher", "RayLauncher", "SlurmLauncher", "LAUNCHERS",
]
