"""Every file foldattn reads is hostile until checked: crafted checkpoints, deployed files, configs.

Each case is a file an attacker (or bad luck) could hand to `foldattn fold` / `load_deployed` /
`foldattn train -c`; each must end in one line naming the problem (exit 2 on the command line),
never in a traceback, a silent cast, a download, another file opened, or gigabytes allocated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from foldattn import create_model, load_deployed, save_deployed
from foldattn.cli import main
from foldattn.deploy import ArchitectureMismatchError, DeployedFileError, UntrustedBuilderError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(digits_asr_run: Path) -> Path:
    return digits_asr_run


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid weights file the crafted checkpoints point at: it must never be opened."""
    path = tmp_path_factory.mktemp("secret") / "secret.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    return path


def _set(blob: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        blob = blob[p]
    if value is _DELETE:
        del blob[leaf]
    else:
        blob[leaf] = value


_DELETE = object()


def _weight(blob: dict[str, Any], key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    blob["model"][key] = change(blob["model"][key])


def _timm_checkpoint(blob: dict[str, Any], secret: Path) -> None:
    blob["config"].update(model="timm:resnet18", attention=None, asr=False,
                          model_kwargs={"checkpoint_path": str(secret)})


# (id, change to the checkpoint dict, text of the one-line error)
CHECKPOINTS: list[tuple[str, Callable[[dict[str, Any], Path], None], str]] = [
    ("config-a-string", lambda b, s: _set(b, "config", "cifar_resnet20"), "'config' is missing or not a mapping"),
    ("config-missing", lambda b, s: _set(b, "config", _DELETE), "'config' is missing"),
    ("model-missing", lambda b, s: _set(b, "model", _DELETE), "'model' is missing"),
    ("model-not-tensors", lambda b, s: _set(b, "model", {"conv1.weight": [1, 2]}), "not a state dict"),
    ("run-a-string", lambda b, s: _set(b, "run", "digits"), "'run' is a str"),
    ("negative-image-size", lambda b, s: _set(b, "run.image_size", [-4, 16]), "run 'image_size'"),
    ("huge-class-count", lambda b, s: _set(b, "run.classes", 10**9), "run 'classes'"),
    ("version-a-string", lambda b, s: _set(b, "version", "1"), "'version'"),
    ("epoch-negative", lambda b, s: _set(b, "epoch", -3), "'epoch'"),
    ("optimizer-a-list", lambda b, s: _set(b, "optimizer", [1, 2]), "'optimizer' is a list"),
    ("history-a-dict", lambda b, s: _set(b, "history", {"a": 1}), "'history'"),
    ("std-negative", lambda b, s: _set(b, "run.preprocessing", {"mean": [0.1] * 3, "std": [-1.0] * 3}),
     "run 'preprocessing'"),
    ("model-a-number", lambda b, s: _set(b, "config.model", 5), "--model 5: expected a string"),
    ("attention-a-list", lambda b, s: _set(b, "config.attention", ["se"]), "--attention"),
    ("milestones-a-number", lambda b, s: _set(b, "config.milestones", 5), "--milestones 5"),
    ("seed-2-70", lambda b, s: _set(b, "config.seed", 2**70), "--seed"),
    ("model-unknown", lambda b, s: _set(b, "config.model", "no_such_model"), "no_such_model"),
    ("timm-checkpoint-path", _timm_checkpoint, "checkpoint_path"),
    ("torchvision-weights-backbone", lambda b, s: b["config"].update(
        model="torchvision:fasterrcnn_mobilenet_v3_large_fpn", attention=None, asr=False,
        model_kwargs={"weights_backbone": "DEFAULT"}), "weights_backbone"),
    ("device-meta", lambda b, s: _set(b, "config.model_kwargs", {"device": "meta"}), "device"),
    ("dtype", lambda b, s: _set(b, "config.model_kwargs", {"dtype": "float16"}), "dtype"),
    ("path-in-kwargs", lambda b, s: b["config"].update(model="cifar_vit_tiny", model_kwargs={"patch_size": "/etc"}),
     "no paths"),
    ("int8-weights", lambda b, s: _weight(b, "conv1.weight", lambda t: t.to(torch.int8)), "dtype mismatches"),
    ("bool-weights", lambda b, s: _weight(b, "fc.bias", lambda t: t > 0), "dtype mismatches"),
    ("complex-weights", lambda b, s: _weight(b, "fc.weight", lambda t: t.to(torch.complex64)), "dtype mismatches"),
    ("nan-int-buffer", lambda b, s: _weight(b, "bn1.num_batches_tracked", lambda t: torch.tensor(float("nan"))),
     "dtype mismatches"),
    ("huge-depth", lambda b, s: b["config"].update(model="cifar_vit_tiny", attention=None, asr=False,
                                                   model_kwargs={"depth": 100_000}), "asks for more than the file"),
]


def _craft(run: Path, tmp_path: Path, secret: Path, change: Callable[[dict[str, Any], Path], None]) -> Path:
    blob = torch.load(run / "last.pt", weights_only=True)
    change(blob, secret)
    path = tmp_path / "crafted.pt"
    torch.save(blob, path)
    return path


@pytest.mark.parametrize(("case", "change", "message"), CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_crafted_checkpoints_are_one_line(run: Path, secret: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          case: str, change: Callable[[dict[str, Any], Path], None],
                                          message: str) -> None:
    crafted = _craft(run, tmp_path, secret, change)
    out = tmp_path / "out"
    before = os.stat(secret).st_atime_ns
    assert main(["fold", str(crafted), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("foldattn fold: error:") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not out.exists()
    assert os.stat(secret).st_atime_ns == before or "noatime" in _mount_options(secret)


def _mount_options(path: Path) -> str:
    try:
        return Path("/proc/mounts").read_text()
    except OSError:
        return "noatime"


_AUDIT = textwrap.dedent('''
    import json, os, sys
    opened, network = [], []
    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(args[0])))
        elif event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.bind",
                       "socket.sendto", "socket.sendmsg", "urllib.Request", "http.client.connect"):
            network.append(event)
            raise RuntimeError("network access: " + event)
    sys.addaudithook(hook)
    from foldattn.cli import main
    rc = main(sys.argv[1:])
    print(json.dumps({"rc": rc, "opened": opened, "network": network}))
''')


def _audited(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _AUDIT, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["timm-checkpoint-path", "torchvision-weights-backbone", "honest"])
def test_fold_opens_nothing_but_its_files_and_never_the_network(run: Path, secret: Path, tmp_path: Path,
                                                                case: str) -> None:
    if case == "honest":
        crafted = run / "last.pt"
    else:
        change = next(c[1] for c in CHECKPOINTS if c[0] == case)
        crafted = _craft(run, tmp_path, secret, change)
    out = tmp_path / "out"
    result = _audited(["fold", str(crafted), "-o", str(out)])
    assert result["network"] == []
    assert result["rc"] == (0 if case == "honest" else 2)
    library = [os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, os.path.dirname(torch.__file__),
                                             str(Path(__file__).resolve().parents[1] / "src")}]
    system = ("/proc/", "/sys/", "/dev/", "/etc/", "/usr/", "/lib", "/tmp/torchinductor", "/root/.cache/")
    probes = os.path.realpath(tempfile.gettempdir())  # Python's tempfile probes its folder with a short-lived file
    foreign = [p for p in result["opened"]
               if not any(p.startswith(lib + os.sep) or p == lib for lib in library) and not p.startswith(system)
               and os.path.realpath(crafted) != p and not p.startswith(os.path.realpath(out))
               and not (os.path.dirname(p) == probes and not os.path.exists(p))]
    assert foreign == [], foreign
    assert os.path.realpath(secret) not in result["opened"]


# --- deployed files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dep") / "m.safetensors"
    save_deployed(create_model("cifar_resnet20"), path)
    return path


def _rewrite(src: Path, dest: Path, meta_change: Callable[[dict[str, Any]], Any] | None = None,
             tensor_change: Callable[[dict[str, torch.Tensor]], None] | None = None, raw_meta: str | None = None
             ) -> Path:
    from foldattn.deploy import _checksum

    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["foldattn"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if tensor_change is not None:
        tensor_change(tensors)
        meta["checksum"] = _checksum(tensors)  # a careful attacker recomputes it
    if meta_change is not None:
        meta = meta_change(meta) or meta
    save_file(tensors, str(dest), metadata={"foldattn": raw_meta if raw_meta is not None else json.dumps(meta)})
    return dest


DEPLOYED = [
    ("device-meta", dict(meta_change=lambda m: m["kwargs"].update(device="meta")), UntrustedBuilderError, "device"),
    ("dtype", dict(meta_change=lambda m: m["kwargs"].update(dtype="float64")), UntrustedBuilderError, "dtype"),
    ("int8-weights", dict(tensor_change=lambda t: t.update({"conv1.weight": t["conv1.weight"].to(torch.int8)})),
     ArchitectureMismatchError, "dtype mismatches"),
    ("float-counter", dict(tensor_change=lambda t: t.update(
        {"bn1.num_batches_tracked": torch.tensor(float("nan"))})), ArchitectureMismatchError, "dtype mismatches"),
    ("deep-json", dict(raw_meta="[" * 200_000 + "]" * 200_000), DeployedFileError, "nested"),
    ("nan-literal", dict(raw_meta='{"format": NaN}'), DeployedFileError, "NaN"),
    ("huge-classes", dict(meta_change=lambda m: m["kwargs"].update(num_classes=2**24)), ArchitectureMismatchError,
     "asks for more than the file holds"),
]


@pytest.mark.parametrize(("case", "change", "error", "message"), DEPLOYED, ids=[c[0] for c in DEPLOYED])
def test_crafted_deployed_files(deployed: Path, tmp_path: Path, case: str, change: dict[str, Any],
                                error: type[Exception], message: str) -> None:
    crafted = _rewrite(deployed, tmp_path / "x.safetensors", **change)
    with pytest.raises(error, match=message):
        load_deployed(crafted)


# --- configs ---------------------------------------------------------------------------------------


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    return str(path)


CONFIGS: list[tuple[str, Callable[[Path], str], str]] = [
    ("alias-bomb", lambda p: _text(p, "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"), "aliases"),
    ("dev-zero", lambda p: "/dev/zero", "not a regular file"),
    ("fifo", _fifo, "not a regular file"),
    ("folder", lambda p: str(p), "is a folder"),
    ("huge", lambda p: _text(p, "epochs: 1\n" + "#" * (2 << 20)), "bytes, more than"),
    ("deep", lambda p: _text(p, "a: " + "[" * 100 + "]" * 100 + "\n"), "nested"),
    ("milestones-number", lambda p: _text(p, "milestones: 5\nschedule: step\n"), "--milestones 5"),
    ("not-utf8", lambda p: _bytes(p, b"\xff\xfe\x00epochs: 1"), "not UTF-8"),
    ("unknown-key", lambda p: _text(p, "epochz: 3\n"), "unknown option"),
    ("list", lambda p: _text(p, "- 1\n- 2\n"), "expected a mapping"),
]


def _text(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def _bytes(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(("case", "make", "message"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_hostile_configs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                      make: Callable[[Path], str], message: str) -> None:
    path = make(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "-c", path, "--epochs", "1", "--steps-per-epoch", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("foldattn train: error:") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not out.exists()


def test_zip_bomb_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (64 << 20))
    assert main(["fold", str(bomb), "-o", str(tmp_path / "out")]) == 2
    assert "inflates to" in capsys.readouterr().err


def test_fold_holds_the_folder_lock_and_cleans_a_killed_writes_leftovers(run: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    out = tmp_path / "out"
    out.mkdir()
    left = out / ".deployed.safetensors.foldattn-k1ll3d.tmp"  # what a fold killed mid-write leaves
    left.write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "t"}))
        assert main(["fold", str(run / "last.pt"), "-o", str(out)]) == 2  # another fold is writing here
        assert f"in use by PID {holder.pid}" in capsys.readouterr().err
        assert not (out / "deployed.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match="stale lock"):
        assert main(["fold", str(run / "last.pt"), "-o", str(out)]) == 0
    assert not left.exists() and not (out / ".lock").exists()
    assert sorted(p.name for p in out.iterdir()) == ["deployed.json", "deployed.safetensors"]
    load_deployed(out / "deployed.safetensors")
