"""Every training option declared once (foldattn.train.options): arguments, -c keys, checks, resume rule."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from foldattn.cli import build_parser, main
from foldattn.train import RESUME_IGNORED, TrainConfig
from foldattn.train.options import Option, add_arguments, check_declared, option, option_names, resume_ignored


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_field_is_declared_and_is_an_argument() -> None:
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert all(isinstance(f.metadata.get("option"), Option) for f in dataclasses.fields(TrainConfig))
    dests = {a.dest for a in _train_parser()._actions}
    assert set(option_names(TrainConfig)) == set(fields) <= dests
    assert set(RESUME_IGNORED) == set(resume_ignored(TrainConfig)) == {
        "output", "data_dir", "cache_dir", "download", "workers", "threads", "compile", "device", "progress",
        "tensorboard", "data_on_device"}


def test_every_option_is_a_config_file_key(tmp_path: Path) -> None:
    """Every option but those that say where the run writes (only the command line says that)."""
    from foldattn.train.arguments import _DESTINATIONS, _from_file

    path = tmp_path / "c.yaml"
    readable = [name for name in option_names(TrainConfig) if name not in _DESTINATIONS]
    path.write_text("\n".join(f"{name.replace('_', '-')}: null" for name in readable))
    assert set(_from_file(str(path))) == set(readable)
    assert set(_DESTINATIONS) == {"output", "cache_dir", "download"}


def test_adding_an_option_is_one_field() -> None:
    """A new option declared on a subclass is an argument, a checked range and an only-if rule at once."""

    @dataclasses.dataclass
    class Extended(TrainConfig):
        warmup_lr: float = option(0.0, low=0.0, high=1.0, only_if=(lambda c: c.warmup_epochs > 0, "needs warm-up"),
                                  help="the learning rate the warm-up starts from")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Extended)
    assert parser.parse_args(["--warmup-lr", "0.5"]).warmup_lr == 0.5
    with pytest.raises(ValueError, match=r"--warmup-lr 2.0: must be a number in \[0, 1\]"):
        check_declared(Extended(warmup_lr=2.0))
    with pytest.raises(ValueError, match="--warmup-lr 0.5: needs warm-up"):
        check_declared(Extended(warmup_lr=0.5))
    check_declared(Extended(warmup_lr=0.5, warmup_epochs=1.0))
    assert "warmup_lr" in option_names(Extended) and "warmup_lr" not in resume_ignored(Extended)


@pytest.mark.parametrize(("argv", "message"), [
    (["--epochs", "1", "--mixup-switch-prob", "0.3"], "--mixup-switch-prob 0.3: mixing is off"),
    (["--epochs", "1", "--image-size", "32"], "only imagefolder:PATH data is resized"),
    (["--epochs", "1", "--schedule", "step", "--milestones", "0"], "--milestones 0: must be an integer >= 1"),
    (["--epochs", "1", "--split-seed", str(2**32)], "--split-seed"),
])
def test_declared_rules_reach_the_command_line(argv: list[str], message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--steps-per-epoch", "1", "-o", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


#: the integer options that set a size or a duration, each with its documented upper bound
BOUNDED = {"epochs": 10_000, "batch_size": 65_536, "steps_per_epoch": 10_000_000, "grad_accum_steps": 1_024,
           "workers": 64, "threads": 256, "patience_epochs": 10_000, "stripe_every": 10_000, "image_size": 4096}


@pytest.mark.parametrize(("name", "high"), BOUNDED.items(), ids=list(BOUNDED))
def test_counts_have_an_upper_bound_at_parse_time_in_config_files_and_in_help(name: str, high: int) -> None:
    action = next(a for a in _train_parser()._actions if a.dest == name)
    assert f"at most {high}" in (action.help or "")
    assert action.type(str(high)) == high
    with pytest.raises(argparse.ArgumentTypeError, match=f"{high + 1} is too large"):
        action.type(str(high + 1))
    with pytest.raises(ValueError, match=f"must be at most {high}"):
        check_declared(TrainConfig(**{name: high + 1}))


@pytest.mark.parametrize("name", ["warmup_epochs", "decay_epochs"])
def test_epoch_lengths_in_floats_are_bounded(name: str) -> None:
    with pytest.raises(ValueError, match=r"must be a number in \[0, 10000\]"):
        check_declared(TrainConfig(**{name: 1e9}))


def test_a_saved_config_with_more_threads_than_this_machine_has_cores_still_loads() -> None:
    """The bound of a saved setting is not this machine's: a run written on a larger machine resumes here."""
    check_declared(TrainConfig(threads=256))
