"""Recipe fidelity on data with known answers (issue 8): one pipeline run, every step scored.

1. Write a known-answer sample (``arena_assets.core.sample``, its own seed) with 4000 test rows
   into a work folder (default ``/tmp/arena-fidelity``), next to a settings file that points at it.
2. Materialize the whole recipe once (``assets.pipeline.materialize_pipeline``: the demo's waves,
   the demo's default settings apart from the sample) into a fresh Dagster instance there.
3. Materialize the ``quality_report`` asset (``assets/quality.py``): it runs the few extra
   inference steps the recipe does not (CE-only students on the test rows, the merged model
   before quantization, without TTA) and scores everything against ``truth.json`` with
   ``core/quality.py``.
4. Optionally the same on the real rows in ``/work/shared/data/arena-real-sample/`` (report only,
   labels instead of truth; skipped when the folder is absent; the rows are copied only into the
   work folder, never into the repository): the first half of ``train_sample.csv`` becomes the
   external pairs of post-pretraining, the second half the train table (so no row is both).

Writes ``benchmarks/results/fidelity.json`` (headline fields ``prior``, ``bayes``, ``best_fold``,
``final``, ``gap_closed_best_fold``, ``gap_closed``, ``kd``, ``ce_only``; the full report under
``report``; ``real`` for the real rows) and ``benchmarks/results/fidelity.md`` (the tables).

    .venv/bin/python benchmarks/bench_fidelity.py [--work DIR] [--no-real] [--test-rows 4000]
        [--task interactions|markers] [--seeds 5] [--quick] [--calibrate-teacher]

Issue 17 (the default since): the known-answer sample is the harder ``interactions`` task
(``core/sample.py``: topic-dependent markers, kind-dependent style markers), the benchmark's own
settings (:data:`TASK_SETTINGS`, written into the work folder's arena.yaml; the demo keeps its
defaults) make the teachers larger than the student and train them on their fold plus external
pairs from the same truth, and the KD-vs-CE student comparison is repeated over ``--seeds`` student
seeds (:func:`student_seed`: only ``student_model`` and ``baseline_student`` re-materialized, the
teachers trained once) and summarised by ``core.quality.seed_summary``. ``--quick`` is the same on
a smaller sample with two seeds (a few minutes, for iterating; its numbers are not the results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "fidelity.json"
REAL = Path(os.environ.get("ARENA_REAL_SAMPLE", "/work/shared/data/arena-real-sample"))

TASK_SETTINGS: dict[str, Any] = {
    # Teachers stronger than the student in the recipe's way (issue 17; docs/fidelity.md lists every
    # variant tried and why this one): a larger model of the student's architecture (Gemma-2, 3
    # layers of width 192, 1.16M parameters, vs the student's 2 of 128, 0.43M), post-pretrained on
    # the same external pairs as the student (step 1, as in the 1st place) ...
    "families": {"gemma_large": {"tiny": {"arch": "gemma2", "num_hidden_layers": 3, "hidden_size": 192,
                                          "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 32,
                                          "intermediate_size": 384}}},
    "teacher_families": ["gemma_large"],
    # ... and fine-tuned on more data: its fold's 4/5 of train plus every external pair (4000, drawn
    # from the same truth; the 1st place added 33k external rows to 46k fold rows), fully (no
    # LoRA: a teacher is never averaged). Fold-honest: a teacher predicts only its held-out fold,
    # and train.teacher_training_rows refuses external ids in it.
    "teacher": {"use_external": True, "max_external_rows": None, "lora": {"enabled": False}},
    # KD weights as the 1st place's loss: (CE + KL + cos per teacher) / 5 puts 4/5 on the teachers
    # (one teacher here: alpha 0.8), at temperature 1.
    "student": {"kd": {"alpha": 0.8, "temperature": 1.0}},
}
"""The benchmark's settings for the interactions task, laid over the repository's arena.yaml."""
CALIBRATE_TEACHER: dict[str, Any] = {"student": {"kd": {"calibrate_teacher": True}}}
"""--calibrate-teacher (issue 17's V3, pre-registered in docs/fidelity.md): the KD students distil
the teachers' OOF divided by a temperature fitted on each teacher's own held-out fold (its labels);
the teachers, their OOF table and the CE-only students are unchanged."""
QUICK = {"train_rows": 1000, "test_rows": 1000, "external_rows": 2000, "seeds": 2,
         "settings": {"teacher": {"max_external_rows": 1200}}}
"""--quick: the same recipe on a smaller sample, two seeds (iterating, not results)."""
SEED_BASE = {"train": 42, "init": 1234}
"""Seed 0 is the pipeline's own student/baseline seeds; seed i adds i to both (data order and
adapter init), the same for the KD and the CE-only student of a seed."""


def write_settings(work: Path, sample: dict[str, int] | None, truth: bool, external: bool,
                   overrides: dict[str, Any] | None = None) -> Path:
    """A settings file in ``work``: the repository's arena.yaml with inputs/artifacts moved there
    (and ``overrides`` laid over it)."""
    from arena_assets.core.settings import _deep_merge

    base = yaml.safe_load((REPO / "arena.yaml").read_text()) if (REPO / "arena.yaml").exists() else {}
    base = _deep_merge(base or {}, overrides or {})
    if overrides and "teacher_families" in overrides:  # only the families in use (each gets a base)
        used = {base.get("student_family", "gemma"), *overrides["teacher_families"]}
        base["families"] = {k: v for k, v in base.get("families", {}).items() if k in used}
    base["artifact_root"] = "artifacts"
    base["data"] = {"train_csv": "inputs/train.csv", "test_csv": "inputs/test.csv",
                    "external": "inputs/external.csv" if external else None,
                    "truth_json": "inputs/truth.json" if truth else None}
    if sample:
        base["sample"] = sample
    base.setdefault("compute", {}).update({"backend": "local", "local_mode": "inprocess"})
    path = work / "arena.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def run_pipeline(work: Path, settings_path: Path, extra_inference: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Materialize the recipe and the quality report in a fresh instance under ``work``."""
    from dagster import AssetKey, DagsterInstance, materialize

    from arena_assets.assets.pipeline import materialize_pipeline
    from arena_assets.definitions import build_definitions

    home = work / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    if (REPO / "deploy/local/dagster.yaml").exists():  # the embedded instance config (SQLite)
        shutil.copy(REPO / "deploy/local/dagster.yaml", home / "dagster.yaml")
    defs = build_definitions(str(settings_path))
    instance = DagsterInstance.from_config(str(home))
    t0 = time.time()
    run = materialize_pipeline(defs, instance, echo=lambda s: print(f"[{time.time() - t0:7.1f}s] {s}", flush=True))
    t1 = time.time()
    print(f"[{t1 - t0:7.1f}s] quality_report (extra inference: {extra_inference})", flush=True)
    res = materialize(list(defs.assets), selection=[AssetKey("quality_report")], instance=instance,
                      resources=defs.resources, tags={"arena/stage": "quality"},
                      run_config={"ops": {"quality_report": {"config": {"extra_inference": extra_inference}}}})
    if not res.success:
        raise RuntimeError("quality_report failed")
    from arena_assets.core import artifacts
    from arena_assets.core.settings import load_settings

    s = load_settings(str(settings_path))
    rep = json.loads((artifacts.latest(s.root, "quality_report") / "report.json").read_text())
    timing = {"pipeline_wall_s": run.wall_s, "wave_s": run.wave_s, "quality_report_s": round(time.time() - t1, 2),
              "runs": len(run.run_ids) + 1}
    return rep, timing


def known_answer(work: Path, train_rows: int, test_rows: int, external_rows: int, seed: int,
                 task: str = "interactions", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from arena_assets.core.quality import markdown, summary_fields
    from arena_assets.core.sample import make_sample

    work.mkdir(parents=True, exist_ok=True)
    sample = {"train_rows": train_rows, "test_rows": test_rows, "external_rows": external_rows, "seed": seed}
    made = make_sample(work / "inputs", **sample, task=task)
    settings_path = write_settings(work, sample, truth=True, external=True, overrides=overrides)
    rep, timing = run_pipeline(work, settings_path, extra_inference=True)
    return {**summary_fields(rep), "sample": {**sample, "task": task, "bayes_logloss_test": made["bayes_logloss_test"],
                                              "prior_logloss_test": made["prior_logloss_test"]},
            "settings_overrides": overrides or {}, "timing": timing, "report": rep, "markdown": markdown(rep)}


_STUDENT_KEYS = ("student_model", "baseline_student")
_NOT_COPIED = {"student_model", "baseline_student", "student_calibration", "student_fold_submission", "quality_report",
               "averaged_lora", "merged_model", "quantized_model", "tta_submission", "final_ensemble", ".checkpoints"}


def _copy_of_run(src: Path, dst: Path, override: dict[str, Any], ignore: Any = None) -> tuple[Any, Any, Any, list[Any]]:
    """``src`` (the main run's folder) copied to a fresh ``dst`` with ``override`` merged into its
    arena.yaml: its definitions, settings, an ephemeral instance and the asset list."""
    from dagster import DagsterInstance

    from arena_assets.core.settings import _deep_merge, load_settings
    from arena_assets.definitions import build_definitions

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True, ignore=ignore)
    cfg = _deep_merge(yaml.safe_load((dst / "arena.yaml").read_text()), override)
    (dst / "arena.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    defs = build_definitions(str(dst / "arena.yaml"))
    return defs, load_settings(str(dst / "arena.yaml")), DagsterInstance.ephemeral(), list(defs.assets)


def seed_override(i: int) -> dict[str, Any]:
    """Student seed ``i`` (0 = the pipeline's own): data order and adapter init, identical for the
    KD student and the CE-only student."""
    blk = {"train": {"seed": SEED_BASE["train"] + i}, "lora": {"init_seed": SEED_BASE["init"] + i}}
    return {"student": blk, "baseline": blk}


def student_seed(work: Path, i: int) -> dict[str, Any]:
    """Re-train the KD and the CE-only student of every fold with student seed ``i`` on a copy of
    the main run's artifacts (the same bases, folds and teacher OOF: the teachers are trained
    once), through the recipe's own assets, and score both on the held-out folds' truth."""
    from dagster import AssetKey, materialize

    from arena_assets.core import quality

    src = work / "known"

    def ignore(d: str, names: list[str]) -> list[str]:
        if Path(d) == src:
            return [n for n in names if n == "dagster_home"]
        if Path(d) == src / "artifacts":
            return [n for n in names if n in _NOT_COPIED]
        return []

    dst = work / f"seed-{i}"
    defs, s, inst, assets = _copy_of_run(src, dst, seed_override(i), ignore)
    t0 = time.time()
    for k in range(s.folds.n_folds):
        for key in _STUDENT_KEYS:
            res = materialize(assets, selection=[AssetKey(key)], partition_key=str(k), instance=inst,
                              resources=defs.resources)
            if not res.success:
                raise RuntimeError(f"seed {i}: {key} fold {k} failed")
        print(f"[{time.time() - t0:7.1f}s] seed {i}: fold {k} KD and CE-only students", flush=True)
    out = quality.heldout_students(s, quality.load_truth(s.resolve(s.data.truth_json)))
    out["wall_s"] = round(time.time() - t0, 1)
    out["seed"] = {"train": s.student.train.seed, "init": s.student.lora.init_seed}
    shutil.rmtree(dst, ignore_errors=True)  # models are not needed once scored
    return out


def seeds(work: Path, n: int, teacher_heldout: float | None) -> dict[str, Any]:
    """The KD-vs-CE comparison over ``n`` student seeds: seed 0 from the main run's own students,
    seeds 1..n-1 re-trained (:func:`student_seed`)."""
    from arena_assets.core import quality
    from arena_assets.core.settings import load_settings

    s = load_settings(str(work / "known" / "arena.yaml"))
    per = [{**quality.heldout_students(s, quality.load_truth(s.resolve(s.data.truth_json))),
            "seed": {"train": s.student.train.seed, "init": s.student.lora.init_seed}}]
    for i in range(1, n):
        per.append(student_seed(work, i))
    summary = quality.seed_summary(per, teacher_heldout)
    labels = [f"{i} (train {r['seed']['train']}, init {r['seed']['init']})" for i, r in enumerate(per)]
    return {"per_seed": per, "summary": summary, "markdown": quality.seed_markdown(summary, per, labels)}


def rescore(work: Path) -> dict[str, Any]:
    """Rebuild the report from an earlier run's artifacts (after a change to core/quality.py's
    scoring only; no training or inference): the extra predictions come from the latest
    quality_report version."""
    from arena_assets.core import artifacts, quality
    from arena_assets.core.settings import load_settings

    s = load_settings(str(work / "arena.yaml"))
    q = artifacts.latest(s.root, "quality_report")
    extra = {}
    if q is not None and (q / "extra").exists():
        for d in (q / "extra").iterdir():
            name = d.name if not d.name.startswith("baseline_") else quality.EXTRA_BASELINE.format(k=d.name.split("_")[1])
            extra[name] = d / "predictions.parquet"
    return quality.build_report(s, quality.load_truth(s.resolve(s.data.truth_json)), extra)


def experiment(work: Path, name: str, override: dict[str, Any]) -> dict[str, Any]:
    """Re-train only the teachers and the KD students of an earlier run under a settings override
    (a copy of its work folder: the same bases, folds, CE-only students and extra predictions)
    and score KD vs CE-only. Why: the KD-vs-CE question needs a few variants, and a whole
    pipeline per variant would not fit the budget (about 5 min each instead of 14).

    Note that an override of a nested block (``teacher.train``) replaces its unnamed fields with
    the class defaults, not the parent's defaults: name every field that matters.
    """
    from dagster import AssetKey, materialize


    dst = work / f"exp-{name}"
    defs, s, inst, assets = _copy_of_run(work / "known", dst, override)
    t0 = time.time()
    teachers = [k for f in s.teacher_families for k in (AssetKey([f, "teacher_model"]), AssetKey([f, "teacher_oof_probs"]))]
    students = [AssetKey("student_model"), AssetKey("student_calibration"), AssetKey("student_fold_submission")]
    for sel in (teachers, [AssetKey("teacher_oof")], students):
        parts = [None] if sel == [AssetKey("teacher_oof")] else [str(k) for k in range(s.folds.n_folds)]
        for pk in parts:
            res = materialize(assets, selection=sel, partition_key=pk, instance=inst, resources=defs.resources)
            if not res.success:
                raise RuntimeError(f"experiment {name}: {sel} {pk} failed")
            print(f"[{time.time() - t0:7.1f}s] experiment {name}: {[k.to_user_string() for k in sel]} {pk}", flush=True)
    rep = rescore(dst)
    return {"override": override, "teacher_pooled": {f: v["pooled"] for f, v in rep["teacher"].items()},
            "kd_held_out": rep["kd"]["held_out"]["pooled"], "ce_only_held_out": rep["ce_only"]["held_out"]["pooled"],
            "kd_raw": rep["kd"]["test"]["mean"], "ce_only_raw": rep["ce_only"]["test"]["mean"],
            "kd": rep["kd"]["test"]["calibrated_mean"], "ce_only": rep["ce_only"]["test"]["calibrated_mean"],
            "best_fold": rep["best_fold"], "gap_closed_best_fold": rep["gap_closed_best_fold"],
            "wall_s": round(time.time() - t0, 1)}


def seed_fields(sm: dict[str, Any]) -> dict[str, Any]:
    """The headline held-out fields of fidelity.json from a ``seed_summary``: means over the seeds
    (seed 0's alone are in ``report.kd`` / ``report.ce_only``)."""
    return {
        "kd_heldout": sm["raw"]["kd_mean"], "ce_only_heldout": sm["raw"]["ce_only_mean"],
        "kd_heldout_calibrated": sm["calibrated"]["kd_mean"], "ce_only_heldout_calibrated": sm["calibrated"]["ce_only_mean"],
        "kd_minus_ce_heldout": sm["raw"]["kd_minus_ce_mean"],
        "kd_minus_ce_heldout_calibrated": sm["calibrated"]["kd_minus_ce_mean"],
        "kd_minus_ce_seed_spread": sm["raw"]["kd_minus_ce_sd"],
        "kd_minus_ce_seed_spread_calibrated": sm["calibrated"]["kd_minus_ce_sd"],
        "seed_targets_met": sum(bool(t["met"]) for t in sm["targets"] if t["met"] is not None),
        "seed_targets_measured": sum(t["met"] is not None for t in sm["targets"]),
    }


def real_rows(work: Path) -> dict[str, Any] | None:
    """The recipe on the real rows (report only): labels instead of truth."""
    import pandas as pd

    from arena_assets.core.quality import markdown

    src = REAL / "train_sample.csv"
    if not src.exists() or not (REAL / "test.csv").exists():
        print(f"real rows: {REAL} absent, skipped", flush=True)
        return None
    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    df = df.drop(columns=[c for c in df.columns if c.startswith("Unnamed")])
    half = len(df) // 2
    df.iloc[:half].to_csv(inputs / "external.csv", index=False)
    df.iloc[half:].to_csv(inputs / "train.csv", index=False)
    shutil.copy(REAL / "test.csv", inputs / "test.csv")
    settings_path = write_settings(work, None, truth=False, external=True)
    rep, timing = run_pipeline(work, settings_path, extra_inference=False)
    return {"rows": {"external": half, "train": len(df) - half, "test": 3}, "timing": timing,
            "prior_labels": rep["prior_train"],
            "teacher_pooled": {f: v["pooled"] for f, v in rep["teacher"].items()},
            "kd_pooled": rep["kd"]["held_out"]["pooled"], "ce_only_pooled": rep["ce_only"]["held_out"]["pooled"],
            "calibrated_fold_labels": {k: v.get("fitted_labels_after") for k, v in rep["calibration"]["folds"].items()},
            "report": rep, "markdown": markdown(rep)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/arena-fidelity")
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--test-rows", type=int, default=4000)
    ap.add_argument("--external-rows", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--task", default="interactions", choices=["interactions", "markers"],
                    help="the known-answer task (markers: the demo's, with the demo's settings)")
    ap.add_argument("--seeds", type=int, default=5, help="student seeds of the KD-vs-CE comparison")
    ap.add_argument("--quick", action="store_true",
                    help="smaller sample, two seeds, no real rows (minutes; for iterating, not results)")
    ap.add_argument("--calibrate-teacher", action="store_true",
                    help="KD students distil per-fold temperature-calibrated teacher OOF "
                         "(student.kd.calibrate_teacher; docs/fidelity.md V3)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--rescore", action="store_true",
                    help="only re-score the artifacts of an earlier run in --work and update --out")
    ap.add_argument("--experiment", nargs=2, metavar=("NAME", "JSON_OVERRIDE"),
                    help="re-train teachers and KD students of the run in --work under a settings override; "
                         "adds experiments[NAME] to --out")
    args = ap.parse_args()
    if args.experiment:
        name, over = args.experiment[0], json.loads(args.experiment[1])
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        res = experiment(Path(args.work), name, over)
        out = Path(args.out)
        body = json.loads(out.read_text())
        body.setdefault("experiments", {})[name] = res
        out.write_text(json.dumps(body, indent=1, default=float) + "\n")
        print(json.dumps(res, indent=1, default=float))
        return 0
    if args.rescore:
        from arena_assets.core.quality import markdown, summary_fields

        out = Path(args.out)
        old = json.loads(out.read_text())
        rep = rescore(Path(args.work) / "known")
        old.update(summary_fields(rep), report=rep, rescored_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        md = "# Fidelity benchmark (generated)\n\n## Known-answer sample\n\n" + markdown(rep)
        if isinstance(old.get("seeds"), dict):  # the seed comparison is not re-scored; keep its means
            from arena_assets.core.quality import seed_markdown

            old.update(seed_fields(old["seeds"]["summary"]))
            per = old["seeds"]["per_seed"]
            labels = [f"{i} (train {r['seed']['train']}, init {r['seed']['init']})" for i, r in enumerate(per)]
            md += "\n" + seed_markdown(old["seeds"]["summary"], per, labels)
        if isinstance(old.get("real"), dict) and "report" in old["real"]:
            real = rescore(Path(args.work) / "real")
            old["real"]["report"] = real
            md += "\n## Real rows (labels, report only)\n\n" + markdown(real)
        out.write_text(json.dumps(old, indent=1, default=float) + "\n")
        out.with_suffix(".md").write_text(md)
        print(md)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    overrides: dict[str, Any] = json.loads(json.dumps(TASK_SETTINGS)) if args.task == "interactions" else {}
    if args.calibrate_teacher:
        from arena_assets.core.settings import _deep_merge

        overrides = _deep_merge(overrides, CALIBRATE_TEACHER)
    if args.quick:
        from arena_assets.core.settings import _deep_merge

        args.train_rows, args.test_rows, args.external_rows = (QUICK["train_rows"], QUICK["test_rows"],
                                                               QUICK["external_rows"])
        args.seeds, args.no_real = min(args.seeds, QUICK["seeds"]), True
        if args.task == "interactions":
            overrides = _deep_merge(overrides, QUICK["settings"])
        if args.out == str(OUT):  # quick numbers are not results: kept out of the repository
            args.out = str(Path(args.work) / "fidelity-quick.json")
    t0 = time.time()
    result: dict[str, Any] = known_answer(work / "known", args.train_rows, args.test_rows, args.external_rows, args.seed,
                                          task=args.task, overrides=overrides)
    result["wall_s_known"] = round(time.time() - t0, 2)
    if args.seeds > 1:
        t1 = time.time()
        sd = seeds(work, args.seeds, result.get("teacher_heldout"))
        result["seeds"] = {k: v for k, v in sd.items() if k != "markdown"}
        result["seeds"]["wall_s"] = round(time.time() - t1, 2)
        result["markdown"] += "\n" + sd["markdown"]
        result.update(seed_fields(sd["summary"]))
    result["wall_s_known_and_seeds"] = round(time.time() - t0, 2)
    out = Path(args.out)

    def save() -> None:
        result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "platform": platform.platform(), "load_avg": list(os.getloadavg())}
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        result["command"] = " ".join([".venv/bin/python", "benchmarks/bench_fidelity.py", *sys.argv[1:]])
        body = {k: v for k, v in result.items() if k != "markdown"}
        if isinstance(body.get("real"), dict):
            body["real"] = {k: v for k, v in body["real"].items() if k != "markdown"}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(body, indent=1, default=float) + "\n")
        md = "# Fidelity benchmark (generated)\n\n## Known-answer sample\n\n" + result["markdown"]
        if isinstance(result.get("real"), dict):
            md += "\n## Real rows (labels, report only)\n\n" + result["real"]["markdown"]
        out.with_suffix(".md").write_text(md)

    save()  # the known-answer numbers are kept even if the real-rows run fails
    print(result["markdown"], flush=True)
    if not args.no_real:
        t1 = time.time()
        try:
            result["real"] = real_rows(work / "real")
        except Exception as e:  # noqa: BLE001 - report only: record why, keep the main result
            result["real"] = {"error": f"{type(e).__name__}: {e}"}
        if isinstance(result["real"], dict):
            result["real"]["wall_s"] = round(time.time() - t1, 2)
    result["wall_s"] = round(time.time() - t0, 2)
    save()
    print(json.dumps({k: result.get(k) for k in ("prior", "bayes", "best_fold", "final", "gap_closed_best_fold",
                                                  "gap_closed", "kd", "ce_only", "kd_raw", "ce_only_raw",
                                                  "teacher_heldout", "kd_heldout", "ce_only_heldout",
                                                  "kd_heldout_calibrated", "ce_only_heldout_calibrated",
                                                  "kd_minus_ce_seed_spread", "wall_s")}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
