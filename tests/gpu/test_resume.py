"""Checkpoints: a killed run resumes; a changed setting never reuses; a failed step leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.gpu.conftest import FMT, RESUME_TEACHER, TEACHER

from arena_assets.core.settings import settings_hash
from arena_assets.gpu.train import checkpoint_dir_for, train_teacher

JOB = Path(__file__).with_name("resume_job.py")


def _complete_checkpoints(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("checkpoint-*/trainer_state.json"))


def test_killed_training_resumes_from_its_last_checkpoint(data: dict[str, Any], base: Any, tmp_path: Path) -> None:
    ckpt = checkpoint_dir_for(tmp_path / "ckpt", "teacher", 0, settings_hash(RESUME_TEACHER), "data-v1")
    args = {"base": str(base.path("model")), "train": str(data["train0"]), "valid": str(data["valid0"]),
            "out": str(tmp_path / "killed"), "ckpt": str(ckpt), "slow_s": 0.3}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(JOB), json.dumps(args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not _complete_checkpoints(ckpt):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "killed").exists()  # killed before the end: no output version
    saved = json.loads(_complete_checkpoints(ckpt)[-1].read_text())["global_step"]
    assert saved >= RESUME_TEACHER.train.save_steps

    r = train_teacher(base.path("model"), RESUME_TEACHER, FMT, data["train0"], data["valid0"], None,
                      out_dir=tmp_path / "resumed", checkpoint_dir=ckpt)
    info = r.info["train"]
    assert info["resumed_from"] is not None and info["resumed_global_step"] >= saved
    total = info["global_step"]
    assert total > info["resumed_global_step"]
    hist = json.loads(r.path("history").read_text())
    assert hist[-1].get("step", total) == total

    # a changed setting: its own checkpoint dir (new hash), which starts afresh ...
    changed = RESUME_TEACHER.model_copy(update={"train": RESUME_TEACHER.train.model_copy(update={"learning_rate": 5e-4})})
    other = checkpoint_dir_for(tmp_path / "ckpt", "teacher", 0, settings_hash(changed), "data-v1")
    assert other != ckpt
    # ... and pointing it at the old dir anyway is refused, never silently resumed
    with pytest.raises(ValueError, match="belongs to other settings"):
        train_teacher(base.path("model"), changed, FMT, data["train0"], data["valid0"], None,
                      out_dir=tmp_path / "wrong", checkpoint_dir=ckpt)
    assert not (tmp_path / "wrong").exists()


def test_failed_step_leaves_no_partial_output(data: dict[str, Any], base: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from arena_assets.gpu import predict

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(predict, "predict_logits", boom)
    quick = TEACHER.model_copy(update={"train": TEACHER.train.model_copy(update={"max_steps": 2})})
    with pytest.raises(RuntimeError, match="simulated"):
        train_teacher(base.path("model"), quick, FMT, data["train0"], data["valid0"], None, out_dir=tmp_path / "v1")
    assert list(tmp_path.iterdir()) == []  # neither the version dir nor a staging dir remains
