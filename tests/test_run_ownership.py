"""A run is the user's: a command writes only under the folder named on its own command line, and a path
read from a file (a checkpoint's output folder, cache folder or dataset) is a record, checked before any use.

Each case hands a command a run folder or checkpoint whose records point somewhere else (another run, a
folder full of somebody's files) and asserts where the command wrote and what it read there.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from foldattn.cli import main
from foldattn.train.checkpoint import load_checkpoint

torch.set_num_threads(1)


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit(checkpoint: Path, dest: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    blob = torch.load(checkpoint, weights_only=True)
    change(blob)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, dest)
    return dest


def _image_tree(root: Path, classes: list[str], per_class: int = 3, size: int = 16) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


@pytest.fixture()
def run(digits_asr_run: Path, tmp_path: Path) -> Path:
    """A private copy of a finished digits run (1 epoch, 2 steps)."""
    return Path(shutil.copytree(digits_asr_run, tmp_path / "RA"))


@pytest.fixture()
def victim(tmp_path: Path) -> Path:
    """Somebody's finished work: nothing may be written, renamed or deleted here."""
    folder = tmp_path / "victim"
    folder.mkdir()
    for name in ("last.pt", "best.pt", "summary.json", "notes.txt"):
        (folder / name).write_bytes(name.encode() * 10)
    return folder


class Opened:
    """Files and folders opened or listed under ``root`` while the block runs (Python audit events)."""

    def __init__(self, root: Path) -> None:
        self.root, self.opened, self.listed = str(root.resolve()), [], []
        self.active = False

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or event not in ("open", "os.scandir", "os.listdir"):
            return
        try:
            path = str(Path(args[0]).resolve()) if args and isinstance(args[0], (str, Path)) else ""
        except (OSError, ValueError):
            return
        if path.startswith(self.root):
            (self.opened if event == "open" else self.listed).append(path)


@pytest.fixture()
def audit() -> Iterator[Callable[[Path], Opened]]:
    hooks: list[Opened] = []

    def watch(root: Path) -> Opened:
        hook = Opened(root)
        hook.active = True
        hooks.append(hook)
        sys.addaudithook(hook)  # cannot be removed: deactivated below
        return hook

    yield watch
    for h in hooks:
        h.active = False


TRAIN = ["--epochs", "2", "--allow-config-change", "--no-progress"]


def test_a_copied_run_resumes_in_the_copy(run: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(run, tmp_path / "RB"))
    before = _fingerprint(run)
    assert main(["train", "--resume", str(copy), *TRAIN]) == 0
    assert _fingerprint(run) == before, "the original run was written to"
    assert load_checkpoint(copy)["epoch"] == 2
    assert load_checkpoint(copy)["config"]["output"] == str(copy)


# (id, what the crafted checkpoint records: a change to its config)
RECORDS = [
    ("output-names-another-run", lambda cfg, victim: cfg.update(output=str(victim))),
    ("cache-dir-in-another-run", lambda cfg, victim: cfg.update(cache_dir=str(victim / "cache"))),
    ("output-and-cache", lambda cfg, victim: cfg.update(output=str(victim), cache_dir=str(victim))),
    ("output-relative", lambda cfg, victim: cfg.update(output="../victim")),
    ("download-into-another-run", lambda cfg, victim: cfg.update(data_dir=str(victim), download=True)),
]


@pytest.mark.parametrize("change", [c for _, c in RECORDS], ids=[i for i, _ in RECORDS])
def test_a_resumed_checkpoint_writes_only_beside_itself(run: Path, victim: Path, tmp_path: Path,
                                                        change: Callable[[dict[str, Any], Path], None],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "mine"
    ckpt = _edit(run / "last.pt", here / "last.pt", lambda b: change(b["config"], victim))
    before = _fingerprint(victim)
    monkeypatch.chdir(here)  # a relative record resolves next to the victim, were it followed
    assert main(["train", "--resume", str(ckpt), *TRAIN]) == 0
    assert _fingerprint(victim) == before, "a recorded path was used as a destination"
    assert (here / "summary.json").is_file() and load_checkpoint(here)["epoch"] == 2


def test_an_explicit_output_forks_the_run_there(run: Path, tmp_path: Path) -> None:
    before = _fingerprint(run)
    fork = tmp_path / "fork"
    assert main(["train", "--resume", str(run / "last.pt"), "-o", str(fork), *TRAIN]) == 0
    assert _fingerprint(run) == before
    assert load_checkpoint(fork)["epoch"] == 2


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """An image folder holding the digits run's ten classes ('0' .. '9')."""
    return _image_tree(tmp_path / "digits-tree", [str(i) for i in range(10)])


@pytest.fixture()
def system(tmp_path: Path) -> Path:
    """A folder that is not the run's data: 40 sub-folders of other files (what /etc or /usr look like)."""
    root = tmp_path / "system"
    for i in range(40):
        (root / f"pkg{i}").mkdir(parents=True)
        (root / f"pkg{i}" / "config.png").write_bytes(b"not an image")
    return root


def _records(dataset: str, run_change: Callable[[dict[str, Any]], None] | None = None
             ) -> Callable[[dict[str, Any]], None]:
    def change(blob: dict[str, Any]) -> None:
        blob["config"]["dataset"] = dataset
        blob["config"]["val_split"] = 0.3
        if run_change is not None:
            run_change(blob["run"])
    return change


# (id, recorded dataset given the fixtures (tree, system, tmp), change to the recorded run info, error or None)
DATASETS: list[tuple[str, Callable[[Path, Path, Path], str], Callable[[dict[str, Any]], None] | None, str | None]] = [
    ("the-runs-own-folder", lambda t, s, tmp: f"imagefolder:{t}", None, None),
    ("a-system-folder", lambda t, s, tmp: f"imagefolder:{s}", None, "not the run's 10 classes"),
    ("a-missing-folder", lambda t, s, tmp: f"imagefolder:{tmp / 'gone'}", None, "not a folder on this machine"),
    ("a-file", lambda t, s, tmp: f"imagefolder:{s / 'pkg0' / 'config.png'}", None, "not a folder"),
    ("same-count-other-names", lambda t, s, tmp: f"imagefolder:{t}",
     lambda r: r.update(class_names=[f"c{i}" for i in range(10)]), "not the run's 10 classes"),
    ("count-only-recorded-and-wrong", lambda t, s, tmp: f"imagefolder:{s}", lambda r: r.pop("class_names"),
     "has 40 class folders, not the run's 10"),
    ("count-only-recorded-and-right", lambda t, s, tmp: f"imagefolder:{t}", lambda r: r.pop("class_names"), None),
    ("nothing-recorded", lambda t, s, tmp: f"imagefolder:{s}", lambda r: (r.pop("class_names"), r.pop("classes")),
     "not its classes"),
]


@pytest.mark.parametrize("command", ["eval", "train", "stripe"])
@pytest.mark.parametrize("dataset, run_change, error", [c[1:] for c in DATASETS], ids=[c[0] for c in DATASETS])
def test_a_recorded_dataset_is_checked_before_it_is_read(run: Path, tree: Path, system: Path, tmp_path: Path,
                                                        audit: Callable[[Path], Opened], command: str,
                                                        dataset: Callable[[Path, Path, Path], str],
                                                        run_change: Callable[[dict[str, Any]], None] | None,
                                                        error: str | None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    if command != "eval" and error is None and run_change is not None:
        pytest.skip("one accepted case per command is enough")
    ckpt = _edit(run / "last.pt", tmp_path / "crafted" / "last.pt", _records(dataset(tree, system, tmp_path),
                                                                             run_change))
    watched = audit(system)
    argv = {"eval": ["eval", str(ckpt), "--amp", "none"], "train": ["train", "--resume", str(ckpt), *TRAIN],
            "stripe": ["stripe", str(ckpt), "-o", str(tmp_path / "stripes"), "--max-images", "8",
                       "--batch-size", "8"]}[command]
    code = main(argv)
    err = capsys.readouterr().err
    if error is None and command == "stripe":  # the data passed its check (an ASR model has no gate to record)
        assert "records the dataset" not in err and "no input-dependent channel-attention module" in err, err
    elif error is None:
        assert code == 0, err
    else:
        assert code == 2 and error in err and "pass --dataset" in err and "Traceback" not in err
    assert watched.opened == [], f"opened files of a folder the file named: {watched.opened[:3]}"
    assert len(watched.listed) <= 2, "walked a folder the file named"


def test_the_user_can_name_the_data_instead(run: Path, system: Path, tree: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _edit(run / "last.pt", tmp_path / "crafted" / "last.pt", _records(f"imagefolder:{system}"))
    assert main(["eval", str(ckpt), "--dataset", f"imagefolder:{tree}", "--amp", "none"]) == 0, \
        capsys.readouterr().err


NEW_RUN = ["train", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "16", "--no-progress"]


@pytest.mark.parametrize("argv, message", [
    ([*NEW_RUN, "-o", "{run}"], "holds another run's files (last.pt, best.pt, summary.json, metrics.csv)"),
    ([*NEW_RUN, "-o", "{victim}"], "holds another run's files (last.pt, best.pt, summary.json)"),
    (["train", "--resume", "{run}", "-o", "{victim}", *TRAIN], "holds another run's files"),
    ([*NEW_RUN, "-c", "{tmp}/c.yaml"], "'output' says where the run writes"),
], ids=["new-run-over-a-finished-run", "new-run-over-somebodys-files", "fork-over-somebodys-files",
        "config-file-names-the-output"])
def test_a_run_does_not_write_over_another(run: Path, victim: Path, tmp_path: Path, argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text(f"output: {victim}\n")
    before = {p: _fingerprint(p) for p in (run, victim)}
    code = main([a.format(run=run, victim=victim, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert {p: _fingerprint(p) for p in (run, victim)} == before


@pytest.mark.parametrize("key, flag", [("output", "-o/--output"), ("cache-dir", "--cache-dir"),
                                       ("download", "--download")])
def test_a_config_file_cannot_say_where_a_run_writes(tmp_path: Path, key: str, flag: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text(f"{key}: {'true' if key == 'download' else tmp_path / 'elsewhere'}\n")
    assert main([*NEW_RUN, "-c", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"pass {flag}" in err and not (tmp_path / "o").exists() and not (tmp_path / "elsewhere").exists()


def test_overwrite_replaces_a_finished_run(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*NEW_RUN, "-o", str(run), "--overwrite"]) == 0, capsys.readouterr().err
    assert load_checkpoint(run)["config"]["steps_per_epoch"] == 1


def test_a_failed_command_leaves_no_empty_folder_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    existing = tmp_path / "existing"
    existing.mkdir()
    for out in (tmp_path / "new" / "deeper" / "run", existing):
        assert main([*NEW_RUN, "-o", str(out)]) == 2
        assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "new").exists(), "the folders the command made were left behind"
    assert existing.is_dir(), "a folder the user had was removed"


def test_sigterm_mid_write_leaves_no_temporary_and_no_folder(digits_asr_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import signal

    import safetensors.torch

    real = safetensors.torch.save_file

    def killed_midway(tensors: Any, path: str, metadata: Any = None) -> None:
        real(tensors, path, metadata=metadata)  # the temporary file is complete, not yet renamed
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler or `kill` sends

    monkeypatch.setattr(safetensors.torch, "save_file", killed_midway)
    out = tmp_path / "new" / "dep"
    assert main(["fold", str(digits_asr_run), "-o", str(out)]) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "a temporary file or a folder of the command's making was left"
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
