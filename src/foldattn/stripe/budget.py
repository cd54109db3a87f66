"""The cheapest converted network within an accuracy budget: which attention sites to keep.

:func:`foldattn.stripe.calibrate` replaces every attention module of a trained model by its mean gate
(the Stripe Observation of Zhong et al., arXiv 2304.06345, applied after training), and
:func:`foldattn.stripe.distill` recovers most of what that costs. Where some sites are not stripes (a
gate that really depends on the input), converting them costs accuracy that distillation does not win
back. This module decides which sites to keep as classic attention:

- :func:`site_costs` measures what each site costs at inference (the time of its module's forward,
  read by hooks registered around one timed pass, never while the model runs elsewhere) and takes
  what it costs to convert from the calibration report (how far the calibrated model's output at the
  site is from the teacher's);
- :func:`keep_order` ranks the sites by accuracy cost per millisecond saved: the first ones are kept first;
- :func:`search_budget` finds the smallest number ``k`` of sites kept, in that order, whose converted
  and distilled model is within ``max_drop`` points of the teacher, by bisection over ``k`` (the
  teacher itself, every site kept, meets any budget and is never trained). Each point it evaluates is
  recorded, so a user can pick another point of the trade-off without running it again.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .._utils import eval_mode

#: the name a site's spatial part goes by in the keep order: its own module name (``layer1.0.attention.spatial``)
_SPATIAL = ".spatial"

K = TypeVar("K")

__all__ = ["SiteCost", "BudgetPoint", "BudgetResult", "site_costs", "keep_order", "search_budget",
           "calibrate_within_budget"]


@dataclass
class SiteCost:
    """One attention site: what keeping it costs at inference and what converting it costs in accuracy."""

    name: str
    #: median milliseconds of the module's forward at batch 1 (its share of the teacher's latency)
    ms: float
    #: how far the calibrated model's output at the site is from the teacher's (relative squared error)
    gap: float
    #: the gate's stripe score (1: the same vector for every input)
    stripe_score: float = math.nan

    @property
    def priority(self) -> float:
        """Accuracy cost of converting per millisecond saved: the higher, the sooner the site is kept."""
        gap = self.gap if math.isfinite(self.gap) else math.inf
        return gap / max(self.ms, 1e-6)


def _clock() -> Callable[[], float]:
    """The process's CPU time with one torch thread (other processes on the machine, such as trainings beside
    a search, barely disturb it); wall time with more (CPU time would add the threads up)."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


@torch.no_grad()
def site_costs(model: nn.Module, names: Sequence[str], example: Tensor, gaps: dict[str, float],
               stripe_scores: dict[str, float] | None = None, repeats: int = 20) -> list[SiteCost]:
    """The cost of each attention site of ``model`` named in ``names``: its module's forward time on
    ``example`` (median of ``repeats`` timed passes; forward pre/post hooks are registered before the
    passes and removed after them; the clock as in :func:`_clock`) and its conversion gap from ``gaps``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {', '.join(missing)} in the model")
    clock = _clock()
    started: dict[str, float] = {}
    spent: dict[str, list[float]] = {n: [] for n in names}
    handles = []

    def pre(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            started[name] = clock()
        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            spent[name].append(clock() - started.pop(name))
        return hook

    for n in names:
        handles.append(modules[n].register_forward_pre_hook(pre(n)))
        handles.append(modules[n].register_forward_hook(post(n)))
    try:
        with eval_mode(model):
            model(example)  # warm-up, not counted
            for n in names:
                spent[n].clear()
            for _ in range(repeats):
                model(example)
    finally:
        for h in handles:
            h.remove()
    scores = stripe_scores or {}
    return [SiteCost(n, 1000 * statistics.median(spent[n]) if spent[n] else 0.0, float(gaps.get(n, math.nan)),
                     float(scores.get(n, math.nan))) for n in names]


def keep_order(costs: Sequence[SiteCost]) -> list[str]:
    """Site names, the first to keep first: highest accuracy cost per millisecond saved (ties: model order)."""
    index = {c.name: i for i, c in enumerate(costs)}
    return [c.name for c in sorted(costs, key=lambda c: (-c.priority, index[c.name]))]


@dataclass
class BudgetPoint:
    """One point of the trade-off: the sites kept, and the converted model's figures."""

    kept: list[str]
    top1: float
    params: int
    latency_ms: dict[str, float] = field(default_factory=dict)
    #: a note on how the point was made (``teacher``: nothing converted, nothing trained)
    note: str = ""
    seconds: float = 0.0

    @property
    def num_kept(self) -> int:
        return len(self.kept)


@dataclass
class BudgetResult:
    """What :func:`search_budget` found: the chosen point, every point it evaluated, the plan per site."""

    max_drop: float
    teacher_top1: float
    order: list[str]
    points: list[BudgetPoint]
    chosen: BudgetPoint
    costs: list[SiteCost] = field(default_factory=list)
    #: how the points' latencies were measured
    latency: str = ""

    @property
    def met(self) -> bool:
        return self.teacher_top1 - self.chosen.top1 <= self.max_drop + 1e-9

    def plan(self) -> list[dict[str, Any]]:
        """Per site (model order): converted, split (a module's spatial part kept, its channel gate folded) or
        kept, and why."""
        kept = set(self.chosen.kept)
        k = len(kept)
        rank = {n: i for i, n in enumerate(self.order)}
        fewer = next((p for p in self.points if p.num_kept == k - 1), None)
        missed = (f"; keeping {k - 1} reached top-1 {fewer.top1:.2f}, more than {self.max_drop:g} point(s) below the "
                  f"teacher's {self.teacher_top1:.2f}") if fewer is not None else ""
        costs = self.costs or [SiteCost(n, math.nan, math.nan) for n in self.order]
        names = {c.name for c in costs}
        out = []
        for c in costs:
            if c.name.endswith(_SPATIAL) and c.name[: -len(_SPATIAL)] in names:
                continue  # said with its site
            why = (f"rank {rank[c.name] + 1} of {len(self.order)} by accuracy cost per ms saved (gap {c.gap:.3g}, "
                   f"{c.ms:.3f} ms)")
            if c.name in kept:
                action, why = "kept", f"{why}: among the first {k} kept{missed}"
            elif c.name + _SPATIAL in kept:
                action = "split"
                why = (f"spatial part kept (rank {rank[c.name + _SPATIAL] + 1}), channel gate converted ({why}: "
                       f"past the first {k})")
            else:
                action, why = "converted", f"{why}: past the first {k}"
            out.append({"site": c.name, "action": action, "why": why})
        return out

    def overhead_removed(self) -> dict[str, float]:
        """Per latency key: the share of the attention's latency overhead the chosen model removes, (teacher -
        chosen) / (teacher - every site converted); NaN where the overhead is not positive."""
        teacher = max(self.points, key=lambda p: p.num_kept)
        none = min(self.points, key=lambda p: p.num_kept)
        out = {}
        for key, t in teacher.latency_ms.items():
            base = none.latency_ms.get(key, math.nan)
            out[key] = (t - self.chosen.latency_ms.get(key, math.nan)) / (t - base) if t - base > 0 else math.nan
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"max_drop": self.max_drop, "teacher_top1": self.teacher_top1, "met": self.met, "latency": self.latency,
                "overhead_removed": self.overhead_removed(),
                "order": self.order, "chosen": {**asdict(self.chosen), "drop": self.teacher_top1 - self.chosen.top1},
                "plan": self.plan(), "costs": [{**asdict(c), "priority": c.priority} for c in self.costs],
                "curve": [{**asdict(p), "num_kept": p.num_kept, "drop": self.teacher_top1 - p.top1}
                          for p in sorted(self.points, key=lambda p: p.num_kept)]}


def search_budget(order: Sequence[str], evaluate: Callable[[list[str]], BudgetPoint], teacher: BudgetPoint,
                  max_drop: float, log: Callable[[str], None] | None = None) -> BudgetResult:
    """The fewest sites kept (the first ``k`` of ``order``) whose converted model is within ``max_drop`` top-1
    points of ``teacher``.

    ``evaluate(kept)`` converts every other site, distils and scores the result. Keeping more sites is
    assumed to cost less accuracy (the order puts the costliest conversions first), so ``k`` is found by
    bisection: ``evaluate`` runs about ``log2(len(order)) + 1`` times. ``k = 0`` (every site converted) is tried
    first; ``k = len(order)`` is ``teacher`` itself (drop 0), never evaluated. Where accuracy does not grow
    with ``k`` the bisection still returns a point within the budget (the teacher at worst).

    Args:
        order: site names, the first to keep first (:func:`keep_order`).
        evaluate: makes and scores the model keeping the given sites.
        teacher: the unconverted model's point (every site kept).
        max_drop: the budget, in top-1 points (>= 0).
    """
    if not math.isfinite(max_drop) or max_drop < 0:
        raise ValueError(f"max_drop must be a number of points >= 0, got {max_drop!r}")
    order = list(order)
    if len(set(order)) != len(order):
        raise ValueError("order names a site twice")
    say = log or (lambda s: None)
    seen: dict[int, BudgetPoint] = {len(order): teacher}

    def within(k: int) -> bool:
        if k not in seen:
            t0 = time.time()
            point = evaluate(order[:k])
            point.seconds = point.seconds or time.time() - t0
            seen[k] = point
            say(f"budget: {k} of {len(order)} site(s) kept -> top-1 {point.top1:.2f} "
                f"(drop {teacher.top1 - point.top1:+.2f}, budget {max_drop:g})")
        return teacher.top1 - seen[k].top1 <= max_drop + 1e-9

    lo, hi = 0, len(order)  # invariant: hi meets the budget
    if not within(0):
        lo = 1
        while lo < hi:
            mid = (lo + hi) // 2
            if within(mid):
                hi = mid
            else:
                lo = mid + 1
    else:
        hi = 0
    return BudgetResult(max_drop, teacher.top1, order, list(seen.values()), seen[hi])


def _spatial_parts(model: nn.Module, sites: Sequence[str]) -> dict[str, nn.Module]:
    """Sites whose module has a part with no constant form (CBAM's spatial gate), and that part."""
    from ..calibrate import dropped_part

    out = {}
    for name in sites:
        module = model.get_submodule(name)
        part = getattr(module, "spatial", None)
        if dropped_part(module) is not None and isinstance(part, nn.Module):
            out[name] = part
    return out


def _with_parts(converted: nn.Module, parts: dict[str, nn.Module], split: Sequence[str]) -> nn.Module:
    """``converted`` (in place) with the spatial part of each ``split`` site put back after what the site
    became (nothing after a fold, or a constant scale): the channel gate a constant, the spatial gate kept."""
    import copy

    from .._utils import set_submodule

    for name in split:
        current = converted.get_submodule(name)
        part = copy.deepcopy(parts[name])
        set_submodule(converted, name, part if isinstance(current, nn.Identity) else nn.Sequential(current, part))
    return converted


def _order_parts(order: list[str], parts: dict[str, nn.Module]) -> list[str]:
    """``order`` with each site's spatial part before the site itself (keeping a whole module keeps its part)."""
    out: list[str] = []
    for name in order:
        if name.endswith(_SPATIAL) and name[: -len(_SPATIAL)] in parts and name in out:
            continue
        if name in parts and name + _SPATIAL not in out:
            out.append(name + _SPATIAL)
        out.append(name)
    return out


def _time_points(models: Mapping[K, nn.Module], inputs: dict[str, Tensor], reps: int = 15,
                 min_sample_s: float = 0.02, clock: Callable[[], float] | None = None
                 ) -> tuple[dict[K, dict[str, float]], str]:
    """Per model and input, the median milliseconds of one eval-mode forward, the models interleaved (the timer
    of ``foldattn bench``; the clock as in :func:`_clock` unless given); also says how."""
    from .._timing import interleaved

    clock = clock or _clock()
    how = ("process CPU time, one thread" if clock is time.process_time
           else f"wall time, {torch.get_num_threads()} thread(s)")
    key = {str(k): k for k in models}
    out: dict[K, dict[str, float]] = {k: {} for k in models}
    with ExitStack() as stack, torch.no_grad():
        for m in models.values():
            stack.enter_context(eval_mode(m))
        for name, x in inputs.items():
            runners = {str(k): functools.partial(m, x) for k, m in models.items()}
            samples = interleaved(runners, reps=reps, warmup=2, min_sample_s=min_sample_s, clock=clock)
            for k, v in samples.items():
                out[key[k]][name] = 1000 * statistics.median(v)
    return out, f"eager PyTorch, median of {reps} interleaved samples, {how}"


def calibrate_within_budget(
    model: nn.Module,
    train: Any,
    train_eval: Any,
    val: Any,
    max_drop: float,
    *,
    example: Tensor,
    distill_epochs: int = 0,
    max_images: int | None = None,
    latency_inputs: dict[str, Tensor] | None = None,
    distill_options: dict[str, Any] | None = None,
    stripes: Any = None,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, BudgetResult]:
    """Convert the attention sites of a trained ``model`` that can go within ``max_drop`` top-1 points on
    ``val``, keeping the others as they are: ``(chosen deployed model, BudgetResult)``.

    Every site is calibrated once on ``train_eval`` (at most ``max_images`` images) to measure its conversion
    gap (:func:`foldattn.stripe.site_gaps` of the all-converted model) and its module's time on ``example[:1]``
    (:func:`site_costs`); :func:`keep_order` ranks them and :func:`search_budget` finds the fewest kept. A
    module whose parts differ (CBAM: a channel gate, and a spatial gate with no constant form) is two items:
    its spatial part (``NAME.spatial``: kept alone, the module is split, the channel gate folded and the
    spatial gate kept) before the whole module. Each point converts the other sites
    (:func:`foldattn.stripe.calibrate`) and, with ``distill_epochs``, distils them from ``model`` on ``train``
    (:func:`foldattn.stripe.distill` with ``distill_options``; the best epoch on ``val`` is kept). Once the
    search ends, every point is timed in eager PyTorch on ``latency_inputs`` (name -> batch; default
    ``{"batch_1": example[:1]}``), the points interleaved so that all see the same load, with the process's CPU
    time as the clock when torch runs one thread (``BudgetResult.latency`` says how).
    ``stripes``: the :class:`~foldattn.stripe.StripeResult` of a calibration of every site already made on
    ``train_eval`` (``CalibrationReport.stripes``), so it is not recorded again.
    """
    from ..calibrate import constant_model
    from ..summary import count_params
    from . import calibration
    from .distillation import distill, distillation_student, site_gaps

    say = log or (lambda s: None)
    if stripes is None:
        stripes = calibration.calibrate(model, train_eval, max_images=max_images)[1].stripes
    if stripes is None:  # pragma: no cover - calibrate() always records
        raise RuntimeError("calibrate() returned no statistics")
    sites = [x.name for x in stripes.layers]
    parts = _spatial_parts(model, sites)
    constant = constant_model(model, stripes)
    gaps = site_gaps(model, constant, sites, val)
    scores = {n: float(v["gate_stripe_score"]) for n, v in stripes.summary().items()}
    items = [*sites, *(n + _SPATIAL for n in parts)]
    timed = {c.name: c for c in site_costs(model, items, example[:1], {}, scores)}
    split_gaps: dict[str, float] = {}
    if parts:  # what keeping the spatial gate wins back: the gap with it dropped minus the gap with it kept
        split_gaps = site_gaps(model, _with_parts(constant_model(model, stripes), parts, list(parts)), list(parts),
                               val)
    costs = []
    for name in sites:
        whole = timed[name]
        if name in parts:
            spatial = timed[name + _SPATIAL]
            costs.append(SiteCost(name + _SPATIAL, spatial.ms, max(gaps[name] - split_gaps[name], 0.0), scores[name]))
            costs.append(SiteCost(name, max(whole.ms - spatial.ms, 1e-6), split_gaps[name], scores[name]))
        else:
            costs.append(SiteCost(name, whole.ms, gaps[name], scores[name]))
    order = _order_parts(keep_order(costs), parts)
    inputs = latency_inputs or {"batch_1": example[:1]}
    models: dict[int, nn.Module] = {len(order): model}

    def point(kept: list[str]) -> BudgetPoint:
        converted = [n for n in sites if n not in kept]  # never empty: keeping every item is the teacher
        split = [n for n in converted if n + _SPATIAL in kept]
        deployed, report = calibration.calibrate(model, train_eval, layers=converted, max_images=max_images)
        if distill_epochs and report.stripes is not None:
            student = _with_parts(distillation_student(constant_model(model, report.stripes), example[:2]), parts,
                                  split)
            deployed, _, _ = distill(model, student, train, val, epochs=distill_epochs, sites=converted,
                                     log=None, **(distill_options or {}))
        else:
            deployed = _with_parts(deployed, parts, split)
        models[len(kept)] = deployed
        return BudgetPoint(list(kept), calibration.evaluate(deployed, val)["top1"], count_params(deployed))

    teacher = BudgetPoint(list(order), calibration.evaluate(model, val)["top1"], count_params(model), note="teacher")
    found = search_budget(order, point, teacher, max_drop, log=say)
    found.costs = costs
    # timed only now, every point in turn, so that points trained minutes apart see the same load
    timings, found.latency = _time_points(models, inputs)
    for p in found.points:
        p.latency_ms = timings[p.num_kept]
    return models[found.chosen.num_kept], found
