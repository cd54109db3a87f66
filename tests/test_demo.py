"""``foldattn demo --quick``: the README's first command, as CI runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from foldattn.cli import main


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SMOKE TEST" in printed  # --quick says that its accuracies mean nothing
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| model")}
    assert set(rows) == {"plain", "+SE", "+ASR(SE)"}
    # the folded ASR model has exactly the plain backbone's parameters; +SE keeps its extra ones
    assert rows["+ASR(SE)"][3] == rows["plain"][3] == rows["plain"][2]
    assert int(rows["+SE"][3].replace(",", "")) > int(rows["plain"][3].replace(",", ""))
    assert int(rows["+ASR(SE)"][2].replace(",", "")) > int(rows["+ASR(SE)"][3].replace(",", ""))
    for r in rows.values():
        assert 0.0 <= float(r[0]) <= 100.0 and float(r[4]) > 0
    report = (out / "report.md").read_text()
    assert "tolerance 1e-10" in report and "curves.png" in report and "SMOKE TEST" in report
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--quick", "-o", str(tmp_path / "f" / "demo")]) == 2
    err = capsys.readouterr().err
    assert "which is a file; name a folder" in err and "Traceback" not in err
    assert (tmp_path / "f").read_text() == "x"
