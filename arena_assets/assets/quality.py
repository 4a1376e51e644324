"""The quality report asset: recipe fidelity against the known answer, as a markdown table (issue 8).

Why an on-demand asset (tag ``arena/on_demand``, left out of :func:`assets.pipeline.plan_waves`'s
default waves, so the demo does not run it): it adds inference runs the recipe itself never needs
(the CE-only students on the test rows, the merged model before quantization, both without TTA).
Those runs call the recipe's own inference steps (``gpu.predict.fold_submission`` /
``tta_submission``) through the compute resource, so they run on the same backend (local, Slurm,
Kubernetes; the GPTQ interpreter for a GPTQ model) as the recipe. All scoring is
:func:`arena_assets.core.quality.build_report`, shared with ``benchmarks/bench_fidelity.py``.

Version directory: ``report.json`` (every number), ``report.md`` (the tables shown in the UI),
``extra/<name>/`` (the extra inference steps' outputs, kept for inspection).
"""


from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)

from arena_assets.assets import recipe as r
from arena_assets.assets.common import Materialization, fold_tables, other_python
from arena_assets.assets.pools import gpu_pool
from arena_assets.core.settings import Settings, settings_hash
from arena_assets.resources.compute import ComputeResource
from arena_assets.resources.settings import SettingsResource

QUALITY_REPORT = AssetKey("quality_report")
QUALITY_VERSION = 1
"""Bumped when core/quality.py's numbers change meaning."""
ON_DEMAND_TAG = "arena/on_demand"
"""Assets with this tag set to ``"true"`` are not in ``plan_waves``' default waves."""


class QualityConfig(Config):
    extra_inference: bool = True
    """Run the extra inference steps (CE-only students on test, merged fp model, no-TTA variants).
    Off: only numbers the pipeline's artifacts already hold."""


def extra_inference(context: Any, s: Settings, m: Materialization, compute: ComputeResource, work: Path) -> dict[str, Path]:
    """Run the inference the recipe does not (see the module docstring); returns the ``extra``
    mapping of :func:`core.quality.build_report` (name -> predictions.parquet)."""
    import json

    from arena_assets.core import quality
    from arena_assets.gpu.predict import fold_submission, tta_submission
    from arena_assets.gpu.quantize import quant_python

    out: dict[str, Path] = {}
    test = m.read(r.TEST_TABLE) / "table.parquet"
    no_tta = s.infer.model_copy(update={"tta": False})
    for k in range(s.folds.n_folds):
        _, va = fold_tables(m, k)
        model = m.read(r.BASELINE_STUDENT, str(k)) / "model"
        d = work / f"baseline_{k}"
        # no calibration file: the KD student's test numbers are compared raw (temperature 1) too
        compute.run(context, "predict", fold_submission, model, None, s.fmt, s.infer, va, test, out_dir=d)
        out[quality.EXTRA_BASELINE.format(k=k)] = d / "predictions.parquet"
    merged = m.read(r.MERGED_MODEL)
    cal = merged / "calibration.json"
    for name, infer in ((quality.EXTRA_MERGED_TTA, s.infer), (quality.EXTRA_MERGED_NO_TTA, no_tta)):
        compute.run(context, "tta", tta_submission, merged / "model", cal, s.fmt, infer, test, out_dir=work / name)
        out[name] = work / name / "predictions.parquet"
    qdir = m.read(r.QUANTIZED_MODEL)
    method = str(json.loads((qdir / "quantization.json").read_text()).get("method"))
    py = other_python(quant_python(s.quant)) if method == "gptq" else None
    name = quality.EXTRA_QUANT_NO_TTA
    compute.run(context, "tta", tta_submission, qdir / "model", cal, s.fmt, no_tta, test, out_dir=work / name, python=py)
    out[name] = work / name / "predictions.parquet"
    return out


def build_quality_assets(settings: Settings) -> list[AssetsDefinition]:
    """The quality report asset for these settings (teacher families as dependencies)."""
    deps = [r.TRAIN_TABLE, r.TEST_TABLE, r.FOLD_DATA, r.STUDENT_MODEL, r.BASELINE_STUDENT, r.STUDENT_CALIBRATION,
            r.STUDENT_FOLD_SUBMISSION, r.MERGED_MODEL, r.QUANTIZED_MODEL, r.TTA_SUBMISSION, r.FINAL_ENSEMBLE,
            *[r.teacher_probs_key(f) for f in settings.teacher_families]]
    # The scoring's own version only: the inference settings it reuses already change its upstreams
    # (and so its data version); a settings change must not touch code versions outside its step.
    cv = settings_hash({"quality": QUALITY_VERSION})

    @asset(key=QUALITY_REPORT, deps=deps, code_version=cv, group_name="quality", pool=gpu_pool(settings),
           tags={ON_DEMAND_TAG: "true"}, kinds={"markdown"},
           description="Recipe fidelity: every step scored against the known answer (truth.json) — teachers, "
                       "KD vs CE-only, calibration, merged vs fold ensemble, quantized vs merged, TTA, "
                       "ensemble modes, gap closed. On demand (not in the demo).")
    def quality_report(context: AssetExecutionContext, config: QualityConfig, settings: SettingsResource,
                       compute: ComputeResource) -> MaterializeResult:
        import json
        import shutil

        from arena_assets.core import quality
        from arena_assets.core.artifacts import atomic_write_json, atomic_write_text, staged_dir

        s = settings.get()
        m = Materialization.begin(context, s, QUALITY_REPORT, None, code_version=cv)
        truth = quality.load_truth(s.resolve(s.data.truth_json))
        work = m.out_dir.parent / f".extra-{m.out_dir.name}"
        try:
            extra = extra_inference(context, s, m, compute, work) if config.extra_inference else {}
            rep = quality.build_report(s, truth, extra)
            md = quality.markdown(rep)
            with staged_dir(m.out_dir) as tmp:
                atomic_write_json(tmp / "report.json", json.loads(json.dumps(rep, default=float)))
                atomic_write_text(tmp / "report.md", md)
                if work.exists():
                    shutil.move(str(work), str(tmp / "extra"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        m.commit()
        head = quality.summary_fields(rep)
        met = [t for t in rep["targets"] if t["met"] is not None]
        meta: dict[str, Any] = {k: float(v) for k, v in head.items() if isinstance(v, (int, float)) and v is not None}
        meta.update(report=MetadataValue.md(md), reference=rep["reference"],
                    targets_met=f"{sum(bool(t['met']) for t in met)}/{len(met)}",
                    path=MetadataValue.path(str(m.out_dir / "report.json")))
        return m.result(m.metadata(**meta))

    return [quality_report]
