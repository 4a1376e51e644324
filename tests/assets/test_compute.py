"""The local compute backend: in-process and child-process runs of the same step function,
failures carry the remote traceback and leave no version behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from dagster import Failure

from arena_assets.core import artifacts
from arena_assets.resources.compute import ComputeResource, LocalBackend
from arena_assets.resources.settings import SettingsResource
from tests.assets import steps_for_tests as steps


def _resource(tmp_path: Path, **compute: str) -> ComputeResource:
    cfg = tmp_path / "arena.yaml"
    cfg.write_text(yaml.safe_dump({"artifact_root": "artifacts", "compute": compute}))
    return ComputeResource(settings=SettingsResource(path=str(cfg)))


@pytest.mark.parametrize("mode", ["inprocess", "subprocess"])
def test_local_modes_run_the_same_step(tmp_path: Path, mode: str) -> None:
    res = _resource(tmp_path, backend="local", local_mode=mode)
    out = artifacts.new_version_dir(tmp_path / "artifacts", "square", "0")
    r = res.run(None, "square", steps.write_square, 3.0, out_dir=out)
    assert r.metrics["square"] == 9.0
    assert r.path("value").read_text() == "9.0"
    assert r.info["compute"]["backend"] == "local" and r.info["compute"]["mode"] == mode
    in_child = r.info["pid"] != os.getpid()
    assert in_child == (mode == "subprocess")


def test_step_python_forces_a_child_process(tmp_path: Path) -> None:
    """The quantization step's own interpreter: a child process even in in-process mode."""
    backend = LocalBackend(tmp_path, "inprocess")
    out = artifacts.new_version_dir(tmp_path, "square")
    from arena_assets.core.settings import StepNeeds

    r = backend.run(None, "square", steps.write_square, [2.0], {}, out, StepNeeds(), python=sys.executable)
    assert r.info["pid"] != os.getpid() and r.info["compute"]["python"] == sys.executable
    assert r.metrics["square"] == 4.0


@pytest.mark.parametrize("mode", ["inprocess", "subprocess"])
def test_failure_carries_the_traceback_and_leaves_nothing(tmp_path: Path, mode: str) -> None:
    res = _resource(tmp_path, backend="local", local_mode=mode)
    out = artifacts.new_version_dir(tmp_path / "artifacts", "crash")
    with pytest.raises(Failure) as e:
        res.run(None, "crash", steps.crash_halfway, out_dir=out)
    assert "simulated crash" in e.value.description
    tb = e.value.metadata["traceback"].value
    assert "crash_halfway" in tb and "RuntimeError" in tb
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")], "staging dir left behind"


def test_unknown_backend_is_refused(tmp_path: Path) -> None:
    res = ComputeResource(settings=SettingsResource(path=None), backend="mainframe")
    with pytest.raises(ValueError, match="mainframe"):
        res.make_backend()
