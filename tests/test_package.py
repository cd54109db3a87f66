"""The library alone needs torch, torchvision, numpy and safetensors; the apps name their extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import foldattn

# Setting sys.modules[name] = None makes any later `import name` raise ImportError, as if the
# package were not installed.
_BLOCK = """
import sys
for name in ("matplotlib", "tqdm", "sklearn", "timm", "onnx", "onnxruntime", "yaml"):
    sys.modules[name] = None
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_library_works_without_app_packages(tmp_path) -> None:
    proc = _run(f"""
        import torch, foldattn
        from foldattn.deploy import save_deployed, load_deployed
        torch.manual_seed(0)
        model = foldattn.create_model("cifar_resnet20", attention="se", asr=True).eval()
        x = torch.randn(2, 3, 32, 32)
        deployed = foldattn.fold(model)
        foldattn.verify(model, deployed, x)
        save_deployed(deployed, {str(tmp_path / "m.safetensors")!r})
        load_deployed({str(tmp_path / "m.safetensors")!r})
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        plain = foldattn.attach(net, "se", where="norms", example_inputs=torch.randn(1, 3, 8, 8))
        foldattn.fold(plain)
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize(("code", "extra"), [
    ("from foldattn.train.data import load_dataset; load_dataset('digits')", "train"),
    ("from foldattn.train.plots import require_matplotlib; require_matplotlib()", "train"),
    ("from foldattn.export import onnx_op_counts; onnx_op_counts('x.onnx')", "onnx"),
    ("from foldattn.builders import resolve_builder; resolve_builder('timm:resnet18')", "timm"),
])
def test_missing_extra_is_named(code: str, extra: str) -> None:
    proc = _run(code)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert f"foldattn[{extra}]" in last, proc.stderr


def test_one_version_source() -> None:
    from importlib.metadata import version

    assert version("foldattn") == foldattn.__version__


def test_changelog_names_the_current_version() -> None:
    """CHANGELOG.md's newest section is the version the package reports, marked current."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    sections = re.findall(r"^## (\d+\.\d+\.\d+)(.*)$", text, flags=re.M)
    assert sections, "CHANGELOG.md has no '## X.Y.Z' section"
    newest, note = sections[0]
    assert newest == foldattn.__version__, f"CHANGELOG's newest is {newest}, the package {foldattn.__version__}"
    assert "current" in note
    assert len({v for v, _ in sections}) == len(sections), "a version has two sections"
