"""The command line: validate, make-sample, exit codes, no heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from arena_assets.cli import SUBCOMMANDS, main


def test_make_sample_then_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert main(["make-sample", "--rows", "80", "--seed", "5", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"train.csv", "test.csv", "external.csv", "truth.json"}
    truth = json.loads((out / "truth.json").read_text())
    assert len(truth["train"]) == 80 and len(truth["test"]) == 20 and len(truth["external"]) == 160
    capsys.readouterr()
    rc = main(["validate", "--train", str(out / "train.csv"), "--test", str(out / "test.csv"),
               "--external", str(out / "external.csv")])
    text = capsys.readouterr().out
    assert rc == 0
    for fragment in ("80 rows", "20 rows", "160 rows", "label balance", "turns per row", "longest cell", "OK"):
        assert fragment in text
    assert main(["validate", "--train", str(out / "train.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["rows"] == 80


def test_console_exit_code_and_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "train.csv"
    bad.write_text("id,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n1,a,b,c,1,0.3,0\n")
    r = subprocess.run([sys.executable, "-m", "arena_assets.cli", "validate", "--train", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: train.csv row 1 (id 1): winner_model_a+winner_model_b+winner_tie = 1.3, must be 1"
    ]
    assert r.stdout == ""


def test_registry_and_light_imports() -> None:
    assert {"validate", "make-sample"} <= set(SUBCOMMANDS)
    code = (
        "import sys, arena_assets.cli, arena_assets.core.contract, arena_assets.core.folds, "
        "arena_assets.core.metrics, arena_assets.core.ensemble, arena_assets.core.sample; "
        "bad = [m for m in ('torch', 'dagster', 'transformers') if m in sys.modules]; print(bad)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.strip() == "[]"
