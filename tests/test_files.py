"""foldattn._files: every YAML, JSON and torch file is read one way, checked, and read as its writer meant."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from foldattn._files import UnreadableFile, load_yaml_file, torch_load
from foldattn.cli import main

SRC = Path(__file__).resolve().parents[1] / "src" / "foldattn"

# (id, YAML text, what it loads to)
NUMBERS: list[tuple[str, str, dict[str, Any]]] = [
    ("exponent-without-dot", "lr: 1e-3", {"lr": 0.001}),
    ("exponent-capital-plus", "wd: 5E+4", {"wd": 50000.0}),
    ("negative-exponent", "x: -2e-5", {"x": -2e-05}),
    ("dot-exponent", "x: 1.5e-2", {"x": 0.015}),
    ("leading-dot", "x: .5e3", {"x": 500.0}),
    ("plain-float", "x: 0.1", {"x": 0.1}),
    ("integer", "x: 164", {"x": 164}),
    ("underscored-integer", "x: 1_000", {"x": 1000}),
    ("quoted-stays-a-string", 'x: "1e-3"', {"x": "1e-3"}),
    ("no-digits-after-e", "x: 12e", {"x": "12e"}),
    ("a-word-with-e", "x: e5", {"x": "e5"}),
    ("inside-a-list", "milestones: [1e2, 2e2]", {"milestones": [100.0, 200.0]}),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in NUMBERS], ids=[c[0] for c in NUMBERS])
def test_yaml_reads_numbers_as_yaml_1_2_does(tmp_path: Path, text: str, expected: dict[str, Any]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    assert load_yaml_file(path, "config") == expected


# (id, YAML text, the one-line error)
REFUSED: list[tuple[str, str, str]] = [
    ("duplicate-top-level", "seeds: [0, 1]\nseeds: [2]\n", "line 2, column 1: the key 'seeds' is given twice"),
    ("duplicate-arm", "arms:\n  plain: []\n  plain: [--asr]\n", "line 3, column 3: the key 'plain' is given twice"),
    ("duplicate-nested-deep", "a:\n  b:\n    c: 1\n    c: 2\n", "the key 'c' is given twice"),
    ("duplicate-flow-mapping", "x: {a: 1, a: 2}\n", "the key 'a' is given twice"),
    ("duplicate-number-key", "1: a\n1: b\n", "the key 1 is given twice"),
    ("alias", "a: &x [1]\nb: *x\n", "anchors and aliases"),
    ("unclosed-list", "a: [1, 2\nb: 3\n", "line 2"),
]


@pytest.mark.parametrize("text, message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_yaml_refuses_what_would_pass_silently(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        load_yaml_file(path, "config")
    assert "\n" not in str(info.value)


def test_a_config_file_lr_1e_3_is_a_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 1e-3\nweight-decay: 5e-4\nepochs: 1\nsteps-per-epoch: 1\nbatch-size: 8\n")
    out = tmp_path / "run"
    assert main(["train", "-c", str(cfg), "-o", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    from foldattn.train.checkpoint import load_checkpoint

    config = load_checkpoint(out)["config"]
    assert config["lr"] == 0.001 and config["weight_decay"] == 0.0005


@pytest.mark.parametrize("text, message", [
    ("arms:\n  plain: []\n  asr-se: [--attention, se, --asr]\n  plain: [--attention, se, --asr]\nseeds: [0]\n"
     "baseline: plain\n", "the key 'plain' is given twice"),
    ("arms:\n  plain: []\n  asr-se: [--attention, se, --asr]\nseeds: [0, 1]\nseeds: [2]\n", "'seeds' is given twice"),
], ids=["two-plain-arms", "two-seeds-lists"])
def test_a_sweep_file_with_a_repeated_key_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      text: str, message: str) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("base: [--recipe, digits, --epochs, '1']\n" + text)
    assert main(["sweep", str(spec), "-o", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _zip_bomb(path: Path) -> Path:
    """A torch-format archive whose one entry deflates 64 MiB of zeros into a few kB."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (64 << 20))
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: _zip_bomb(p / "bomb.pt"), "inflates to"),
    (lambda p: (p / "trunc.pt").write_bytes(b"PK\x03\x04junk") and p / "trunc.pt", "cannot be read"),
    (lambda p: p, "not a regular file"),
    (lambda p: p / "missing.pt", "No such file"),
], ids=["zip-bomb", "truncated", "a-folder", "missing"])
def test_torch_load_checks_before_unpickling(tmp_path: Path, make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        torch_load(make(tmp_path), "weights")


def test_torch_load_refuses_code(tmp_path: Path) -> None:
    path = tmp_path / "code.pt"
    torch.save({"f": print}, path)
    with pytest.raises(UnreadableFile, match="Python objects other than tensors") as info:
        torch_load(path, "weights")
    assert "safe loading refuses" in info.value.why


def test_import_reference_refuses_a_zip_bomb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = _zip_bomb(tmp_path / "ref.pth.tar")
    assert main(["import-reference", str(bomb), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "inflates to" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_every_torch_load_goes_through_the_checked_reader() -> None:
    """The kind, not the case: a new reader of .pt files cannot skip the zip and weights-only checks."""
    calls = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if p.name != "_files.py"
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\btorch\.load\(", line) and not line.lstrip().startswith(("#", '"""'))
             and "``" not in line]
    assert calls == [], f"torch.load outside foldattn._files.torch_load: {calls}"
