"""One materialization of the whole recipe per test session, shared by tests/assets and tests/ui.

Import the fixtures into a conftest (``from tests.pipeline_fixture import *``, or list the names):
``pipeline`` yields a :class:`PipelineSession` with the settings file, the persistent Dagster
instance (``DAGSTER_HOME``) and the artifact root after every asset of a tiny sample was
materialized in-process, all 5 folds. The first test that asks for it pays (about 2 minutes on
2 cores); every later one, in either folder, reuses it.

Tiny means: 300 train rows, 60 test, 300 external; 1-layer models of width 32; a few optimizer
steps per training step; short max lengths. It proves wiring, metadata and checks, not quality.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "intermediate_size": 64, "vocab_size": 800, "max_position_embeddings": 256}
_TRAIN = {"max_steps": 4, "per_device_batch_size": 8, "max_length": 96, "warmup_steps": 0,
          "logging_steps": 2, "save_steps": 1000}


def tiny_settings(root: Path) -> dict[str, Any]:
    """The settings file of the test session (relative paths resolve against ``root``)."""
    return {
        "artifact_root": "artifacts",
        "data": {"train_csv": "inputs/train.csv", "test_csv": "inputs/test.csv",
                 "external": "inputs/external.csv", "truth_json": "inputs/truth.json"},
        "sample": {"train_rows": 300, "test_rows": 60, "external_rows": 300, "seed": 7},
        "families": {"gemma": {"tiny": {"arch": "gemma2", **TINY}},
                     "llama": {"tiny": {"arch": "llama", **TINY}}},
        "student_family": "gemma",
        "teacher_families": ["llama"],
        "fmt": {"max_length": 96, "prompt_max_tokens": 24},
        "post_pretrain": {"train": {**_TRAIN, "max_steps": 6}, "max_rows": 200},
        "teacher": {"train": _TRAIN, "lora": {"r": 4, "alpha": 8}, "max_external_rows": 100},
        "student": {"train": _TRAIN, "lora": {"r": 4, "alpha": 8}},
        "baseline": {"train": _TRAIN, "lora": {"r": 4, "alpha": 8}, "kd": {"alpha": 0.0}},
        "quant": {"n_calibration": 8, "calibration_max_length": 96},
        "infer": {"max_length": 96, "batch_size": 32},
        "ensemble": {"mode": "blend"},
    }


@dataclass
class PipelineSession:
    root: Path
    settings_path: Path
    dagster_home: Path
    artifacts: Path
    instance: Any
    defs: Any
    run: Any


def write_session_files(root: Path) -> Path:
    """Settings file, sample inputs and dagster.yaml for a session rooted at ``root``."""
    from arena_assets.core.sample import make_sample

    root.mkdir(parents=True, exist_ok=True)
    cfg = tiny_settings(root)
    path = root / "arena.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    make_sample(root / "inputs", **{k: cfg["sample"][k] for k in ("train_rows", "test_rows", "external_rows", "seed")})
    home = root / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(REPO / "deploy" / "local" / "dagster.yaml", home / "dagster.yaml")
    return path


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> PipelineSession:
    """The whole recipe materialized once per session into a persistent instance."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from dagster import DagsterInstance

    from arena_assets.assets.pipeline import materialize_pipeline
    from arena_assets.definitions import build_definitions

    root = tmp_path_factory.mktemp("arena_session")
    settings_path = write_session_files(root)
    defs = build_definitions(str(settings_path))
    instance = DagsterInstance.from_config(str(root / "dagster_home"))
    run = materialize_pipeline(defs, instance, echo=print)
    return PipelineSession(root=root, settings_path=settings_path, dagster_home=root / "dagster_home",
                           artifacts=root / "artifacts", instance=instance, defs=defs, run=run)
