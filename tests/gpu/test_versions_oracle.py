"""An independent oracle for the code versions: what every step READS, observed while it runs.

Each step of the recipe runs here on tiny real models (CPU, one or two optimizer steps, a few
dozen rows) with settings objects that record every field read through them (a subclass of the
settings class whose ``__getattribute__`` notes ``teacher.train.learning_rate`` and so on;
properties such as ``ModelSpec.is_tiny`` are recorded through the fields they read). The steps are
called the way the assets call them (tests/core/test_versions.py checks the assets' calls against
the registry). Then every settings field is changed on its own, and per step (through the
public API, ``settings_hash(settings.for_step(step, family))``):

* changing a field the step read (not marked speed-only) changes the step's version;
* changing a field the step never read (in any of the runs that take its branches: tiny and
  real base, with and without LoRA, every ensemble mode) leaves its version alone, except the few
  listed in NOT_EXERCISED with the branch that reads them;
* no step reads a field marked ``read_by_no_step``.

Serializing a settings object (checkpoint fingerprints, metadata) is not a read. A ``ModelSpec``
saved into a model directory and read back (``gpu.models.read_spec``) is recorded too: inside
post-pretraining as the family's own spec; in later steps as a read of the upstream ARTIFACT,
which is why those steps' versions do not hash the spec (see core/versions.py).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from arena_assets.core.settings import (
    AverageSettings,
    CalibrationSettings,
    EnsembleSettings,
    FoldSettings,
    FormatSettings,
    InferSettings,
    KDSettings,
    LoraSettings,
    ModelSpec,
    PostPretrainSettings,
    QuantSettings,
    Settings,
    StudentSettings,
    TeacherSettings,
    TinyModelConfig,
    TrainSettings,
    settings_hash,
)
from tests.core.settings_mutation import leaves, marker, mutated

# --------------------------------------------------------------------------------- recording
_META: dict[int, tuple[set[str], str]] = {}
_KEEP: list[Any] = []  # recorded objects stay alive: their ids stay theirs


@cache
def _recording_class(cls: type[BaseModel]) -> type[BaseModel]:
    fields = frozenset(cls.model_fields)

    def __getattribute__(self: Any, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in fields and not isinstance(value, BaseModel):
            meta = _META.get(id(self))
            if meta is not None:
                meta[0].add(f"{meta[1]}.{name}")
        return value

    return type(f"Recording{cls.__name__}", (cls,), {"__getattribute__": __getattribute__, "__module__": __name__})


def recording(obj: BaseModel, reads: set[str], prefix: str) -> Any:
    """A copy of ``obj`` (same class, by subclassing) that adds ``prefix.field`` to ``reads``
    on every read of a leaf field, nested settings included."""
    values = {n: (recording(v, reads, f"{prefix}.{n}") if isinstance(v, BaseModel) else v)
              for n in type(obj).model_fields for v in [getattr(obj, n)]}
    inst = _recording_class(type(obj)).model_construct(**values)
    _META[id(inst)] = (reads, prefix)
    _KEEP.append(inst)
    return inst


# --------------------------------------------------------------------------------- settings
TINY = TinyModelConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=32, intermediate_size=96, max_position_embeddings=256, vocab_size=1500)
TRAIN = TrainSettings(learning_rate=1e-3, per_device_batch_size=8, max_steps=2, max_length=64, warmup_steps=0,
                      logging_steps=1, save_steps=1, eval_steps=1, label_smoothing=0.05)
LORA = LoraSettings(r=4, alpha=8)
S = Settings(
    families={"gemma": ModelSpec(tiny=TINY), "llama": ModelSpec(tiny=TINY.model_copy(update={"arch": "llama"}))},
    folds=FoldSettings(n_folds=2, seed=3),
    fmt=FormatSettings(prompt_max_tokens=16),
    post_pretrain=PostPretrainSettings(train=TRAIN, lora=LoraSettings(enabled=False), max_rows=60),
    teacher=TeacherSettings(train=TRAIN, lora=LORA, use_external=True, max_external_rows=16),
    student=StudentSettings(train=TRAIN, lora=LORA, kd=KDSettings(alpha=0.5, mse_weight=0.1, cos_weight=0.1)),
    baseline=StudentSettings(train=TRAIN, lora=LORA, kd=KDSettings(alpha=0.0)),
    calibration=CalibrationSettings(max_iter=20),
    average=AverageSettings(),
    quant=QuantSettings(methods=["none"], n_calibration=8, calibration_max_length=64),
    infer=InferSettings(max_length=64, batch_size=16),
    ensemble=EnsembleSettings(),
)
"""The oracle's settings: the versions compared are those of this object and of its one-field
changes (public API: ``settings_hash(settings.for_step(step, family))``)."""

NOT_EXERCISED: dict[str, dict[str, str]] = {
    "quantize": {
        "quant.bits": "read on the GPTQ path only (the .venv-quant interpreter; test_quantize.py)",
        "quant.group_size": "read on the GPTQ path only (the .venv-quant interpreter; test_quantize.py)",
    },
}
"""Hashed fields this CPU oracle cannot reach, with the branch that reads them."""


# --------------------------------------------------------------------------------- the runs
class Oracle:
    def __init__(self) -> None:
        self.reads: dict[str, set[str]] = {}
        self.artifact_reads: dict[str, set[str]] = {}
        self.current: str = ""
        self.spec_prefix: str | None = None

    def settings(self, step: str, **params: str) -> dict[str, Any]:
        """Recording views of ``S`` for ``step``'s parameters (``param="settings.path"``)."""
        self.current = step
        reads = self.reads.setdefault(step, set())
        self.artifact_reads.setdefault(step, set())
        out = {}
        for p, path in params.items():
            obj: Any = S
            for part in path.split("."):
                obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
            out[p] = recording(obj, reads, path)
        return out

    def spec_read(self, spec: Any) -> Any:
        if spec is None:
            return None
        if self.spec_prefix is not None:  # post-pretraining reading back its own family's spec
            return recording(spec, self.reads[self.current], self.spec_prefix)
        return recording(spec, self.artifact_reads[self.current], "artifact_spec")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Oracle:
    import pandas as pd
    from _pytest.monkeypatch import MonkeyPatch

    from arena_assets.assets.ensemble import build_ensemble
    from arena_assets.core import contract, folds
    from arena_assets.core.sample import make_sample
    from arena_assets.gpu import average as avg_mod
    from arena_assets.gpu import models
    from arena_assets.gpu.average import average_adapters, merge_adapter
    from arena_assets.gpu.calibrate import calibrate
    from arena_assets.gpu.predict import fold_submission, teacher_oof, tta_submission
    from arena_assets.gpu.pretrain import post_pretrain
    from arena_assets.gpu.quantize import quantize
    from arena_assets.gpu.train import train_student, train_teacher

    o = Oracle()
    root = tmp_path_factory.mktemp("oracle")
    mp = MonkeyPatch()
    real_read_spec, real_avg_spec = models.read_spec, avg_mod._read_spec
    mp.setattr(models, "read_spec", lambda d: o.spec_read(real_read_spec(d)))
    mp.setattr(avg_mod, "_read_spec", lambda d: o.spec_read(real_avg_spec(d)))
    try:
        s = make_sample(root / "raw", train_rows=96, test_rows=24, external_rows=120, seed=5)
        t = {n: contract.write_table(df, root / f"{n}.parquet") for n, df in (
            ("train", contract.read_train(s["train"])), ("test", contract.read_test(s["test"])),
            ("external", contract.read_external(s["external"])))}
        train = contract.read_table(t["train"])

        # folds: the asset hands FoldSettings' fields to core.folds as plain values
        cfg = o.settings("folds", cfg="folds")["cfg"]
        assignment = folds.make_folds(train, cfg.n_folds, cfg.seed, cfg.group_by_prompt)
        folds.write_folds(assignment, root / folds.folds_filename(cfg.n_folds, cfg.seed))
        for k in range(2):
            tr, va = folds.split_fold(train, assignment, k)
            t[f"train{k}"] = contract.write_table(tr, root / f"train{k}.parquet")
            t[f"valid{k}"] = contract.write_table(va, root / f"valid{k}.parquet")
        corpus = [t["train"], t["test"]]

        # post-pretraining: a tiny base; then a "real" checkpoint reached through the downgrade
        # fallback, LoRA-trained and merged (every branch that reads the spec)
        a = o.settings("post_pretrain", spec="families.gemma", cfg="post_pretrain", fmt="fmt")
        o.spec_prefix = "families.gemma"
        base = post_pretrain(a["spec"], a["cfg"], a["fmt"], t["external"], corpus, out_dir=root / "pp_tiny")
        base_dir = base.path("model")
        real = ModelSpec(path=str(root / "no-such-checkpoint"), allow_downgrade=True, downgrade_path=str(base_dir))
        reads = o.reads["post_pretrain"]
        spec = recording(real, reads, "families.gemma")
        cfg = recording(S.post_pretrain.model_copy(update={"lora": LORA}), reads, "post_pretrain")
        post_pretrain(spec, cfg, a["fmt"], t["external"], corpus, out_dir=root / "pp_real")
        o.spec_prefix = None

        # teacher of fold 1 (its OOF covers fold 0's train rows: the student's KD targets)
        a = o.settings("teacher", cfg="teacher", fmt="fmt")
        teacher = train_teacher(base_dir, a["cfg"], a["fmt"], t["train1"], t["valid1"], t["external"],
                                out_dir=root / "teacher", checkpoint_dir=root / "ckpt_teacher")
        a = o.settings("teacher_oof", fmt="fmt", infer="infer", teacher="teacher")
        # as the asset calls it: the OOF at the teachers' own length (teacher.oof_length)
        oof = teacher_oof(teacher.path("model"), a["fmt"], a["infer"], t["valid1"], 1, "llama", out_dir=root / "oof",
                          max_length=a["teacher"].oof_length)

        a = o.settings("student", cfg="student", fmt="fmt")
        student = train_student(base_dir, a["cfg"], a["fmt"], t["train0"], t["valid0"], oof.path("oof"),
                                out_dir=root / "student", checkpoint_dir=root / "ckpt_student")
        a = o.settings("baseline", cfg="baseline", fmt="fmt")
        baseline = train_student(base_dir, a["cfg"], a["fmt"], t["train0"], t["valid0"], None,
                                 out_dir=root / "baseline")

        # as the asset calls it: the fold model's TTA logits of its held-out rows (issue 15)
        a = o.settings("calibration", fmt="fmt", infer="infer", cfg="calibration")
        cal = calibrate(student.path("model"), a["fmt"], a["infer"], t["valid0"], a["cfg"], out_dir=root / "cal")
        a = o.settings("predict", fmt="fmt", infer="infer")
        pred = fold_submission(student.path("model"), cal.path("calibration"), a["fmt"], a["infer"], t["valid0"],
                               t["test"], out_dir=root / "predict")

        a = o.settings("average", cfg="average")
        averaged = average_adapters([student.path("model"), baseline.path("model")], a["cfg"], out_dir=root / "avg")
        a = o.settings("merge", cfg="calibration")
        merged = merge_adapter(averaged.path("adapter"), [1.0, 1.5], a["cfg"], out_dir=root / "merged")
        a = o.settings("quantize", cfg="quant", fmt="fmt")
        quantized = quantize(merged.path("model"), a["cfg"], a["fmt"], t["train"], out_dir=root / "quant")
        a = o.settings("tta", fmt="fmt", infer="infer")
        tta = tta_submission(quantized.path("model"), merged.path("calibration"), a["fmt"], a["infer"], t["test"],
                             out_dir=root / "tta")

        for i, mode in enumerate(["folds_mean", "folds_cv_weighted", "merged", "blend"]):
            cfg = recording(S.ensemble.model_copy(update={"mode": mode}), o.reads.setdefault("ensemble", set()),
                            "ensemble")
            build_ensemble(cfg, {0: Path(cal.out_dir), 1: Path(cal.out_dir)}, {0: Path(pred.out_dir), 1: Path(pred.out_dir)},
                           Path(tta.out_dir), t["train"], root / f"ensemble{i}")
        assert pd.read_csv(root / "ensemble3" / "submission.csv").shape[0] == 24
    finally:
        mp.undo()
    return o


# --------------------------------------------------------------------------------- the checks
INSTANCES: dict[str, list[str | None]] = {
    "folds": [None], "post_pretrain": ["gemma"], "teacher": ["llama"], "teacher_oof": ["llama"],
    "student": [None], "baseline": [None], "calibration": [None], "predict": [None], "average": [None],
    "merge": [None], "quantize": [None], "tta": [None], "ensemble": [None],
}
"""The versions compared, per step (post-pretraining recorded its spec reads as families.gemma)."""

LEAVES = leaves(S)


def _version(settings: Settings, step: str, family: str | None) -> str:
    return settings_hash(settings.for_step(step, family))


def _stale(step: str, path: str) -> bool:
    """Does changing ``path`` alone change ``step``'s code version (the public API)?"""
    changed = mutated(S, path)
    return any(_version(S, step, f) != _version(changed, step, f) for f in INSTANCES[step])


@pytest.mark.parametrize("step", list(INSTANCES))
def test_every_field_a_step_reads_changes_its_version(oracle: Oracle, step: str) -> None:
    """Reads (not speed-only) missing from the version are the issue's first bug."""
    missing, read_unused = [], []
    for path, cls, name, _ in LEAVES:
        if path not in oracle.reads[step]:
            continue
        m = marker(cls, name)
        if m == "speed_only":
            continue
        if m == "unused":
            read_unused.append(path)
        elif not _stale(step, path):
            missing.append(path)
    assert not read_unused, f"{step} reads {read_unused}, marked read_by_no_step"
    assert not missing, f"{step} reads {missing}, yet changing them leaves its version as it was"


@pytest.mark.parametrize("step", list(INSTANCES))
def test_a_field_the_step_never_reads_leaves_its_version_alone(oracle: Oracle, step: str) -> None:
    """Hashing what a step never reads re-runs it for nothing (speed-only settings, calibration
    and the averaging step)."""
    unexercised = NOT_EXERCISED.get(step, {})
    needless = [path for path, _, _, _ in LEAVES
                if path not in oracle.reads[step] and path not in unexercised and _stale(step, path)]
    assert not needless, f"changing {needless} re-runs {step}, which never reads them"


def test_model_steps_read_the_family_spec_from_the_artifact(oracle: Oracle) -> None:
    """The teacher, the students and the inference steps load the spec saved in their model
    directory (post-pretraining wrote it): their versions leave ``families.*`` out (checked
    above) and the base's version and data version carry it."""
    for step in ("teacher", "teacher_oof", "student", "predict", "tta"):
        assert {"artifact_spec.dtype", "artifact_spec.attn_implementation"} <= oracle.artifact_reads[step], step
    assert {"families.gemma.dtype", "families.gemma.attn_implementation", "families.gemma.path"} <= \
        oracle.reads["post_pretrain"]


def test_issue_14_cases(oracle: Oracle) -> None:
    """The issue's examples, observed: the OOF step reads its length (the teachers' own, passed by
    the asset; no longer the inference length) and the TTA flag; averaging never reads
    calibration; batch sizes are read and re-run nothing."""
    assert {"teacher.oof_max_length", "teacher.train.max_length", "infer.tta"} <= oracle.reads["teacher_oof"]
    assert "infer.max_length" not in oracle.reads["teacher_oof"] and not _stale("teacher_oof", "infer.max_length")
    assert _stale("teacher_oof", "teacher.oof_max_length") and _stale("teacher_oof", "infer.tta")
    assert not any(r.startswith("calibration.") for r in oracle.reads["average"])
    assert not any(_stale("average", p) for p, _, _, _ in LEAVES if p.startswith("calibration."))
    assert "infer.batch_size" in oracle.reads["predict"] and not _stale("predict", "infer.batch_size")
    assert _version(S, "merge", None) != _version(S, "average", None)
