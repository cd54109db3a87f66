"""Checkpoint files: atomic writes, safe loading, clear errors for bad files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

from foldattn.models import create_model
from foldattn.train.checkpoint import (
    CheckpointError,
    capture_rng,
    config_diff,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    model = create_model("cifar_resnet20", attention="se", asr=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    return save_checkpoint(tmp_path / "last.pt", model=model, config={"model": "cifar_resnet20", "lr": 0.1},
                           optimizer=opt, scheduler=sched, epoch=3, step=2, history=[{"epoch": 1, "val_top1": 9.5}])


def test_roundtrip(ckpt: Path) -> None:
    blob = load_checkpoint(ckpt)
    assert (blob["epoch"], blob["step"], blob["config"]["lr"]) == (3, 2, 0.1)
    model = create_model("cifar_resnet20", attention="se", asr=True)
    load_model_state(model, blob["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(blob["optimizer"])
    assert len(opt.state) > 0
    assert load_checkpoint(ckpt.parent)["epoch"] == 3  # a folder means its last.pt
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_save_of_a_wrapped_model_has_no_prefix(tmp_path: Path) -> None:
    model = nn.DataParallel(nn.Linear(2, 2))
    blob = load_checkpoint(save_checkpoint(tmp_path / "c.pt", model=model, config={}))
    assert set(blob["model"]) == {"weight", "bias"}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_files_are_refused(ckpt: Path, damage: str) -> None:
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(ckpt)


def test_foreign_and_missing_files(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="import-reference"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):  # pragma: no cover - must never run
        return (print, ("pwned",))


def test_pickled_code_is_not_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"format": "foldattn-checkpoint", "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("other", [
    {"attention": None},                       # plain model: the ASR keys are unexpected
    {"attention": "se", "asr": True, "num_classes": 100},  # another head: shape mismatch
])
def test_other_architecture_is_refused(ckpt: Path, other: dict) -> None:
    model = create_model("cifar_resnet20", **other)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_model_state(model, load_checkpoint(ckpt)["model"])


def test_config_diff() -> None:
    diff = config_diff({"lr": 0.1, "epochs": 5, "output": "a", "m": [1, 2]},
                       {"lr": 0.2, "epochs": 5, "output": "b", "m": (1, 2)}, ignore=["output"])
    assert diff == ["lr: 0.1 -> 0.2"]


def test_rng_roundtrip() -> None:
    state = capture_rng()
    a, b = torch.rand(3), random.random()
    restore_rng(state)
    assert torch.equal(torch.rand(3), a) and random.random() == b


def _momentum(value: object) -> object:
    def change(opt: dict) -> None:
        for s in opt["state"].values():
            s["momentum_buffer"] = value(s["momentum_buffer"]) if callable(value) else value
    return change


# (id, change to the saved optimizer state, the one-line error)
OPTIMIZER_STATES = [
    ("momentum-of-another-shape", _momentum(torch.zeros(3)), "has shape (3,) for a parameter of shape"),
    ("momentum-nan", _momentum(lambda t: torch.full_like(t, float("nan"))), "holds NaN or Inf"),
    ("momentum-inf", _momentum(lambda t: torch.full_like(t, float("inf"))), "holds NaN or Inf"),
    ("one-group-too-many", lambda opt: opt["param_groups"].append(dict(opt["param_groups"][0])),
     "does not fit this run's optimizer"),
    ("no-param-groups", lambda opt: opt.pop("param_groups"), "not what an optimizer saves"),
]


@pytest.mark.parametrize("change, message", [c[1:] for c in OPTIMIZER_STATES], ids=[c[0] for c in OPTIMIZER_STATES])
def test_resume_refuses_an_optimizer_state_that_does_not_fit(digits_asr_run: Path, tmp_path: Path, change: object,
                                                             message: str, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from foldattn.cli import main

    run = Path(shutil.copytree(digits_asr_run, tmp_path / "run"))
    blob = torch.load(run / "last.pt", weights_only=True)
    change(blob["optimizer"])  # type: ignore[operator]
    torch.save(blob, run / "last.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "--epochs", "2", "--allow-config-change", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before, "a refused resume wrote"
