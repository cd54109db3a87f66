"""The learning-rate schedules: foldattn's own, timm's (--sched) and torch's OneCycleLR / ReduceLROnPlateau."""

from __future__ import annotations

import io

import pytest
import torch

from foldattn.train import TrainConfig
from foldattn.train.optim import create_scheduler

SCHEDS = {"cosine": {}, "tanh": {}, "step": {"decay_epochs": 1}, "multistep": {"milestones": [2, 3]}, "poly": {},
          "onecycle": {}, "plateau": {"patience_epochs": 0}}


def _run(cfg: TrainConfig, epochs: range, sched=None, opt=None, metric=lambda e: 50.0):
    if opt is None:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched = create_scheduler(cfg, opt, 10)
    lrs = []
    for e in epochs:
        for _ in range(10):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        sched.step_epoch(e + 1, metric(e))
    return lrs, sched, opt


@pytest.mark.parametrize("name", list(SCHEDS))
def test_sched_warms_up_decays_and_resumes_exactly(name: str) -> None:
    cfg = TrainConfig(epochs=4, sched=name, warmup_epochs=1, lr=1.0, **SCHEDS[name])
    cfg.validate()
    full, _, _ = _run(cfg, range(4))
    assert full[0] < 0.5 and 0.8 < max(full) <= 1.0  # a warm-up towards the peak
    assert full[-1] < 0.75 * max(full)  # then lower
    first, sched, opt = _run(cfg, range(2))
    buf = io.BytesIO()
    torch.save({"sched": sched.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # what a checkpoint holds must load weights-only
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched2 = create_scheduler(cfg, opt2, 10)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    rest, _, _ = _run(cfg, range(2, 4), sched2, opt2)
    assert first + rest == pytest.approx(full)


def test_plateau_lowers_the_rate_when_top1_stalls() -> None:
    cfg = TrainConfig(epochs=6, sched="plateau", lr=1.0, patience_epochs=1, gamma=0.5)
    lrs, _, _ = _run(cfg, range(6), metric=lambda e: [10, 20, 20, 20, 30, 30][e])
    per_epoch = lrs[::10]
    assert per_epoch == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]


def test_builtin_checkpoints_before_sched_still_load() -> None:
    cfg = TrainConfig(epochs=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    old = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for _ in range(3):
        opt.step()
        old.step()
    sched = create_scheduler(cfg, opt, 10)
    sched.load_state_dict(old.state_dict())
    assert sched.updates == 3
