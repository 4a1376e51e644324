"""Concurrency pools per compute backend (assets/pools.py), ``arena-assets pools``, and the
project's dagster.yaml run limits (fast: no cluster, no daemon)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from arena_assets.assets import pools
from arena_assets.core.settings import load_settings
from tests.harness import project_instance_config

REPO = Path(__file__).resolve().parents[2]
ARENA = str(Path(sys.executable).with_name("arena-assets"))


def _settings(tmp_path: Path, compute: dict) -> Path:
    p = tmp_path / "arena.yaml"
    p.write_text(yaml.safe_dump({"artifact_root": str(tmp_path / "a"), "compute": compute}))
    return p


def test_pool_name_and_limit_per_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    local = load_settings(_settings(tmp_path, {"backend": "local"}))
    assert pools.gpu_pool(local) == "gpu" and pools.pool_limit(local) == 1  # no GPU: one step at a time
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert pools.pool_limit(local) == 4  # one GPU step per visible GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,-1,3")
    assert pools.visible_gpus() == 2  # CUDA stops at the first invalid id

    slurm = load_settings(_settings(tmp_path, {"backend": "slurm"}))
    assert pools.gpu_pool(slurm) == "slurm"
    assert pools.pool_limit(slurm) == 8 >= load_settings(None).folds.n_folds  # default >= the 5 folds
    k8s = load_settings(_settings(tmp_path, {"backend": "k8s", "max_parallel_jobs": 12}))
    assert pools.pool_limits(k8s) == {"k8s": 12}


def test_apply_pool_limits_writes_the_instance(tmp_path: Path) -> None:
    s = load_settings(_settings(tmp_path, {"backend": "slurm", "max_parallel_jobs": 6}))
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "deploy" / "local" / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert pools.current_limits(instance, ["slurm"]) == {"slurm": None}
        assert pools.apply_pool_limits(instance, s) == {"slurm": {"before": None, "after": 6}}
        assert pools.current_limits(instance, ["slurm"]) == {"slurm": 6}
        assert pools.apply_pool_limits(instance, s) == {"slurm": {"before": 6, "after": 6}}  # idempotent
    with pytest.raises(ValueError, match="does not support"):
        pools.apply_pool_limits(dg.DagsterInstance.ephemeral(), s)


def test_pools_cli(tmp_path: Path) -> None:
    settings = _settings(tmp_path, {"backend": "slurm", "max_parallel_jobs": 5})
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "deploy" / "local" / "dagster.yaml").read_text())
    env = {"DAGSTER_HOME": str(home), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    out = subprocess.run([ARENA, "pools", "--settings", str(settings), "--json"], capture_output=True, text=True,
                         env=env, check=True)
    assert json.loads(out.stdout) == {"slurm": 5}
    out = subprocess.run([ARENA, "pools", "--settings", str(settings), "--apply"], capture_output=True, text=True,
                         env=env, check=True)
    assert "pool slurm: limit 5 (was unset)" in out.stdout
    # the same limit Dagster's own CLI reports
    got = subprocess.run([str(Path(sys.executable).with_name("dagster")), "instance", "concurrency", "get", "slurm"],
                         capture_output=True, text=True, env=env, check=True)
    assert "slurm" in got.stdout and "5" in got.stdout


def test_dagster_yaml_lets_a_five_fold_backfill_start(tmp_path: Path) -> None:
    cfg = yaml.safe_load((REPO / "deploy" / "local" / "dagster.yaml").read_text())
    assert cfg["concurrency"]["runs"]["max_concurrent_runs"] >= 5
    assert cfg["concurrency"]["pools"]["default_limit"] == 1  # a pool nobody applied stays safe
    # the harness's instance config (project settings + storage + queued coordinator) is valid
    home = tmp_path / "h"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(project_instance_config(home)))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        conf = instance.get_concurrency_config()
        assert conf.run_queue_config is not None and conf.run_queue_config.max_concurrent_runs >= 5
        assert conf.pool_config.default_pool_limit == 1
