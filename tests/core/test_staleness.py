"""Which assets go stale when one setting changes (issue 14), through the public API only.

The asset's code version is ``settings_hash(settings.for_step(step, family))``. The expectations
below are written by hand from what each step function does (gpu/, core/ensemble), not derived
from core/versions.py, so they check the derivation instead of repeating it:

* speed-, placement- and logging-only settings re-run nothing (retraining five folds because of a
  logging interval is the bug);
* a setting a step never receives leaves it alone (``calibration.*`` and the averaging step);
* a setting a step reads always changes its version (``infer.max_length`` and the teachers' OOF).
"""

from __future__ import annotations

from typing import Any

import pytest

from arena_assets.core.settings import Settings, StepNeeds, settings_hash

INSTANCES: list[tuple[str, str | None]] = [
    ("folds", None),
    ("post_pretrain", "gemma"),
    ("post_pretrain", "llama"),
    ("teacher", "llama"),
    ("teacher_oof", "llama"),
    ("student", None),
    ("baseline", None),
    ("calibration", None),
    ("predict", None),
    ("average", None),
    ("merge", None),
    ("quantize", None),
    ("tta", None),
    ("ensemble", None),
]
"""Every versioned step of the default settings (student gemma, teacher llama)."""

TRAIN_BLOCKS = ("post_pretrain.train", "teacher.train", "student.train", "baseline.train")
TRAIN_SPEED = ("logging_steps", "save_steps", "eval_steps", "dataloader_workers", "gradient_checkpointing",
               "packing", "packing_slab_tokens", "compile")
SPEED_ONLY = [
    "infer.batch_size", "infer.gpus", "infer.compile", "infer.slab_tokens", "infer.sort_by_length",
    "quant.python",
    *[f"{b}.{f}" for b in TRAIN_BLOCKS for f in TRAIN_SPEED],
]
"""Settings that change how fast, where or how verbosely a step runs, never what it writes."""

NOT_STEP_SETTINGS = [
    "artifact_root", "data.train_csv", "data.external", "data.truth_json", "sample.train_rows",
    "sample.seed", "automation.cron", "automation.running", "compute.backend", "compute.local_mode",
    "compute.slurm.partition", "compute.slurm.poll_s", "compute.k8s.image", "compute.k8s.shm_gb",
    "fmt.max_length",
]
"""Orchestration, inputs (their data versions, not code versions, cover them) and a length no step
reads (training uses ``TrainSettings.max_length``, inference ``InferSettings.max_length``)."""

EXPECTED: dict[str, set[str]] = {
    # inference: the teachers' OOF reads tta, never the temperature or FP8; it runs at the
    # teachers' own length (teacher.oof_max_length, default the teachers' training length).
    # The fold calibration runs the same TTA as the submissions (issue 15), but whether they
    # apply the temperature is not its business
    "infer.max_length": {"calibration", "predict", "tta"},
    "infer.tta": {"teacher_oof[llama]", "calibration", "predict", "tta"},
    "infer.apply_calibration": {"predict", "tta"},
    "infer.fp8": {"calibration", "predict", "tta"},
    # calibration: the fold fit reads enabled/max_iter, the merge enabled/merged_temperature;
    # averaging adapters reads neither
    "calibration.max_iter": {"calibration"},
    "calibration.merged_temperature": {"merge"},
    "calibration.enabled": {"calibration", "merge"},
    "average.method": {"average"},
    "quant.bits": {"quantize"},
    "ensemble.mode": {"ensemble"},
    "ensemble.blend_weight": {"ensemble"},
    "ensemble.cv_weight_z": {"ensemble"},
    "ensemble.cv_weight_max_ratio": {"ensemble"},
    "folds.seed": {"folds"},
    "folds.n_folds": {"folds"},
    # training
    "post_pretrain.train.learning_rate": {"post_pretrain[gemma]", "post_pretrain[llama]"},
    "post_pretrain.max_rows": {"post_pretrain[gemma]", "post_pretrain[llama]"},
    "teacher.train.learning_rate": {"teacher[llama]"},
    "teacher.lora.r": {"teacher[llama]"},
    "teacher.use_external": {"teacher[llama]"},
    "teacher.train.per_device_batch_size": {"teacher[llama]"},
    "teacher.train.max_length": {"teacher[llama]", "teacher_oof[llama]"},
    "teacher.oof_max_length": {"teacher_oof[llama]"},
    "student.kd.alpha": {"student"},
    "student.kd.temperature": {"student"},
    "student.kd.teacher_families": {"student"},
    "student.train.grad_accum": {"student"},
    "student.lora.init_seed": {"student"},
    "baseline.train.learning_rate": {"baseline"},
    "baseline.kd.label_smoothing": {"baseline"},
    # the CE-only student is never handed teacher probabilities: its KD weights are never read
    "baseline.kd.alpha": set(),
    # formatting reaches every step that tokenizes rows
    "fmt.prompt_max_tokens": {"post_pretrain[gemma]", "post_pretrain[llama]", "teacher[llama]", "teacher_oof[llama]",
                              "student", "baseline", "calibration", "predict", "quantize", "tta"},
    # a family's spec: its post-pretrained base; later steps see it through that artifact
    "families.llama.dtype": {"post_pretrain[llama]"},
    "families.gemma.tiny.hidden_size": {"post_pretrain[gemma]"},
    "families.gemma.span_tags": {"post_pretrain[gemma]"},
    "families.gemma.quantize_base": {"post_pretrain[gemma]"},
}


def _version(s: Settings, step: str, family: str | None) -> str:
    try:
        return settings_hash(s.for_step(step, family))
    except KeyError:  # a step without a version of its own never goes stale
        return "no version"


def versions(s: Settings) -> dict[str, str]:
    return {(f"{st}[{fam}]" if fam else st): _version(s, st, fam) for st, fam in INSTANCES}


def changed(a: Settings, b: Settings) -> set[str]:
    va, vb = versions(a), versions(b)
    return {k for k in va if va[k] != vb[k]}


def _get(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        d = d[part]
    return d


def mutate(path: str, base: Settings | None = None) -> Settings:
    """``base`` with the field at ``path`` set to another valid value."""
    base = base or Settings()
    raw = base.model_dump(mode="python")
    keys = path.split(".")
    parent = _get(raw, ".".join(keys[:-1])) if len(keys) > 1 else raw
    parent[keys[-1]] = _other(path, parent[keys[-1]])
    return Settings.model_validate(raw)


def _other(path: str, v: Any) -> Any:
    special = {
        "infer.fp8": "mlp", "ensemble.mode": "blend", "average.method": "mean_deltas",
        "calibration.merged_temperature": "median", "compute.backend": "slurm", "compute.local_mode": "subprocess",
        "student.kd.teacher_families": ["llama"], "families.llama.dtype": "bfloat16",
        "families.gemma.quantize_base": "8bit", "families.gemma.span_tags": False,
        "infer.gpus": 2, "quant.python": "/opt/quant/bin/python", "data.external": None, "data.truth_json": None,
        "teacher.train.packing_slab_tokens": 4096, "student.train.packing_slab_tokens": 4096,
        "baseline.train.packing_slab_tokens": 4096, "post_pretrain.train.packing_slab_tokens": 4096,
        "post_pretrain.max_rows": 100, "compute.slurm.partition": "gpu", "teacher.oof_max_length": 64,
    }
    if path in special:
        return special[path]
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 2 + 0.25
    if isinstance(v, str):
        return v + "-changed"
    raise AssertionError(f"no mutation for {path}={v!r}")


@pytest.mark.parametrize("path", SPEED_ONLY)
def test_speed_only_settings_rerun_nothing(path: str) -> None:
    assert changed(Settings(), mutate(path)) == set(), f"{path} must not make any asset stale"


@pytest.mark.parametrize("path", NOT_STEP_SETTINGS)
def test_settings_no_step_reads_rerun_nothing(path: str) -> None:
    assert changed(Settings(), mutate(path)) == set()


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_a_setting_makes_exactly_its_readers_stale(path: str) -> None:
    assert changed(Settings(), mutate(path)) == EXPECTED[path]


def test_same_global_batch_is_the_same_training() -> None:
    base = Settings()
    t = base.teacher.train
    assert t.per_device_batch_size == 16 and t.grad_accum == 1
    halved = base.model_copy(update={"teacher": base.teacher.model_copy(
        update={"train": t.model_copy(update={"per_device_batch_size": 8, "grad_accum": 2})})})
    assert changed(base, halved) == set()
    quartered = base.model_copy(update={"teacher": base.teacher.model_copy(
        update={"train": t.model_copy(update={"per_device_batch_size": 8})})})
    assert changed(base, quartered) == {"teacher[llama]"}


def test_data_parallel_ranks_enter_the_global_batch() -> None:
    """Two Slurm ranks double the global batch (teacher stale); halving the per-device batch
    on two ranks gives the one-rank training back."""
    one = Settings.model_validate({**Settings().model_dump(), "compute": {"backend": "slurm"}})
    raw = one.model_dump()
    raw["compute"]["needs"] = {"teacher": StepNeeds(gpus=2, tasks_per_node=2).model_dump()}
    two = Settings.model_validate(raw)
    assert changed(one, two) == {"teacher[llama]"}
    raw["teacher"]["train"]["per_device_batch_size"] = 8
    assert changed(one, Settings.model_validate(raw)) == set()


@pytest.mark.parametrize(("impl", "stale"), [("arena_flex", False), ("flex_attention", False), ("sdpa", True)])
def test_attention_implementations_that_compute_the_same_function(impl: str, stale: bool) -> None:
    """eager / flex / arena_flex apply Gemma-2's softcapping alike; sdpa drops it."""
    raw = Settings().model_dump()
    raw["families"]["gemma"]["attn_implementation"] = impl
    assert changed(Settings(), Settings.model_validate(raw)) == ({"post_pretrain[gemma]"} if stale else set())


def test_merge_has_its_own_version() -> None:
    s = Settings()
    assert _version(s, "merge", None) not in ("no version", _version(s, "average", None))
