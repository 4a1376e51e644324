"""Data-parallel steps: one rank per GPU, derived when unset, a mismatch refused at load time."""

from __future__ import annotations

from pathlib import Path

import pytest

from arena_assets.core.settings import ComputeSettings, StepNeeds, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "settings" / "first_place.example.yaml"


def _needs(tmp_path: Path, text: str) -> dict[str, StepNeeds]:
    p = tmp_path / "arena.yaml"
    p.write_text("compute:\n  needs:\n" + "".join(f"    {line}\n" for line in text.strip().splitlines()))
    return load_settings(p).compute.needs


def test_training_steps_get_one_rank_per_gpu_when_unset(tmp_path: Path) -> None:
    n = _needs(tmp_path, """
post_pretrain: {gpus: 8}
teacher: {gpus: 4}
student: {gpus: 2, tasks_per_node: 2}
tta: {gpus: 2}
teacher_oof: {gpus: 2}
""")
    assert (n["post_pretrain"].tasks_per_node, n["teacher"].tasks_per_node, n["student"].tasks_per_node) == (8, 4, 2)
    # inference steps: one process that shards rows over the job's GPUs (infer.gpus)
    assert n["tta"].tasks_per_node == 1 and n["teacher_oof"].tasks_per_node == 1


def test_a_training_step_with_fewer_ranks_than_gpus_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"compute\.needs\.teacher: tasks_per_node=1 but gpus=4.*one rank per GPU"):
        _needs(tmp_path, "teacher: {gpus: 4, tasks_per_node: 1}")


def test_inference_steps_keep_one_task(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"compute\.needs\.tta: tasks_per_node=2 but tta runs as one process"):
        _needs(tmp_path, "tta: {gpus: 2, tasks_per_node: 2}")


def test_cpu_ranks_stay_free(tmp_path: Path) -> None:
    """gpus 0: CPU ranks over gloo (the real-cluster test trains a teacher with 2 of them)."""
    assert _needs(tmp_path, "teacher: {tasks_per_node: 2}")["teacher"].tasks_per_node == 2


def test_objects_and_round_trips_resolve_the_same() -> None:
    c = ComputeSettings(needs={"student": StepNeeds(gpus=2), "teacher": {"gpus": 4}})
    assert c.needs["student"].tasks_per_node == 2 and c.needs["teacher"].tasks_per_node == 4
    assert ComputeSettings.model_validate(c.model_dump()) == c
    assert ComputeSettings().needs_for("teacher").tasks_per_node == 1


def test_example_settings_run_every_training_gpu_as_a_rank() -> None:
    s = load_settings(EXAMPLE)
    for step in ("post_pretrain", "teacher", "student"):
        n = s.compute.needs_for(step)
        assert n.tasks_per_node == max(1, n.gpus), (step, n)
    for step in ("teacher_oof", "predict", "tta", "quantize"):
        assert s.compute.needs_for(step).tasks_per_node == 1
    assert s.teacher.oof_length == s.teacher.train.max_length == 1024
