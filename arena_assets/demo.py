"""``arena-assets demo``: the whole recipe on the bundled known-answer sample, on CPU, into a
persistent Dagster instance that ``dagster dev -h 127.0.0.1`` then shows with all its history.

1. Generate the sample into the settings' input paths (``.arena/inputs/``) if it is missing.
2. Prepare ``DAGSTER_HOME`` (``.arena/dagster_home``, with the shipped deploy/local/dagster.yaml).
3. Materialize every recipe asset, all folds, with the local backend (assets/pipeline.py: real
   runs in the instance, wave by wave, the order a UI backfill follows).
4. Print the per-fold CV log-loss table, the final submission path and, on the known-answer
   sample, the share of the prior-to-Bayes log-loss gap the final submission closes.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOME = ".arena/dagster_home"
SUMMARY_FILE = "demo_summary.json"

_FALLBACK_DAGSTER_YAML = """telemetry:
  enabled: false
nux:
  enabled: false
run_monitoring:
  enabled: true
run_retries:
  enabled: true
  max_retries: 1
  retry_on_asset_or_op_failure: false
concurrency:
  pools:
    default_limit: 1
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", default=None,
                        help="settings file (default: $ARENA_SETTINGS, else ./arena.yaml, else the defaults)")
    parser.add_argument("--dagster-home", default=None,
                        help=f"persistent Dagster instance folder (default: $DAGSTER_HOME, else {DEFAULT_HOME})")
    parser.add_argument("--folds", default=None, help="only these folds, e.g. 0,1 (default: all)")
    parser.add_argument("--regenerate-sample", action="store_true", help="rewrite the sample inputs first")


def prepare_home(home: Path) -> Path:
    """Create DAGSTER_HOME with the shipped deploy/local/dagster.yaml (``arena-assets home``'s
    ``cli.prepare_home``; a dagster.yaml already there is kept). An installed package without the
    repository's deploy/ folder gets the minimal config below."""
    from arena_assets.cli import prepare_home as install_instance_config
    from arena_assets.cli import shipped_instance_config

    if shipped_instance_config("local").exists():
        install_instance_config(home, "local")
    else:
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "dagster.yaml").exists():
            (home / "dagster.yaml").write_text(_FALLBACK_DAGSTER_YAML)
    return home


def ensure_sample(settings: Any, regenerate: bool = False) -> dict[str, Any] | None:
    """Write the known-answer sample where the settings expect the inputs, if missing."""
    from arena_assets.core.sample import make_sample

    train = settings.resolve(settings.data.train_csv)
    test = settings.resolve(settings.data.test_csv)
    if not regenerate and train.exists() and test.exists():
        return None
    if train.parent != test.parent:
        raise ValueError("the demo writes the sample into one folder: train_csv and test_csv must share it")
    sm = settings.sample
    return make_sample(train.parent, train_rows=sm.train_rows, test_rows=sm.test_rows,
                       external_rows=sm.external_rows, seed=sm.seed)


def _fail_dead_demo_runs(instance: Any) -> int:
    """Mark runs of an earlier, killed demo as failed and free their concurrency slots.

    Why: the demo executes runs in this process; if it was killed, its runs stay "started" and
    keep their ``gpu`` pool slot, and the next demo would wait on that slot forever. Called only
    while holding the demo lock, so no other demo is running.
    """
    from dagster import DagsterRunStatus, RunsFilter

    runs = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING],
                                        tags={"arena/launcher": "demo"}))
    for run in runs:
        instance.report_run_failed(run, "the demo process that ran it is gone")
        try:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        except Exception:  # noqa: BLE001 - storages without pools
            pass
    return len(runs)


def fold_table(settings: Any) -> list[dict[str, Any]]:
    """Per-fold CV metrics read from the latest ``student_fold_submission`` versions."""
    from arena_assets.core import artifacts
    from arena_assets.core.results import StepResult

    rows = []
    for k in range(settings.folds.n_folds):
        v = artifacts.latest(settings.root, "student_fold_submission", str(k))
        if v is None:
            continue
        m = StepResult.read(v).metrics
        rows.append({"fold": k, "cv_logloss_raw": m.get("cv_logloss_raw"), "cv_logloss": m.get("cv_logloss"),
                     "cv_accuracy": m.get("cv_accuracy"), "temperature": m.get("temperature")})
    return rows


def score_against_truth(settings: Any, submission: Path) -> dict[str, float] | None:
    """Expected log-loss of the submission against the sample's true probabilities, and the
    share of the prior-to-Bayes gap it closes (None when there is no truth file)."""
    from arena_assets.core import ensemble, metrics

    truth_path = settings.resolve(settings.data.truth_json)
    if truth_path is None or not truth_path.exists():
        return None
    truth = json.loads(truth_path.read_text())
    sub = ensemble.read_submission(submission)
    t = [truth["test"][str(i)] for i in sub["id"]]
    model = metrics.expected_log_loss(t, sub[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy())
    prior, bayes = float(truth["prior_logloss_test"]), float(truth["bayes_logloss_test"])
    return {"expected_logloss": model, "prior_logloss": prior, "bayes_logloss": bayes,
            "gap_closed": metrics.gap_closed(model, prior, bayes)}


def run_demo(settings_path: str | None, home: Path, folds: list[str] | None = None,
             regenerate: bool = False, echo: Any = print) -> dict[str, Any]:
    """Everything ``main`` does, returning the summary (also written to the artifact root)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from arena_assets.core import artifacts
    from arena_assets.core.settings import load_settings
    from arena_assets.resources.settings import settings_path_from_env

    path = settings_path if settings_path is not None else settings_path_from_env()
    settings = load_settings(path)
    made = ensure_sample(settings, regenerate)
    if made:
        echo(f"sample written to {settings.resolve(settings.data.train_csv).parent}")
    home = prepare_home(home.resolve())
    os.environ["DAGSTER_HOME"] = str(home)

    from dagster import DagsterInstance

    from arena_assets.assets.pipeline import materialize_pipeline
    from arena_assets.definitions import build_definitions

    t0 = time.time()
    defs = build_definitions(path)
    defs_load_s = round(time.time() - t0, 3)
    with open(home / ".demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        instance = DagsterInstance.get()
        # the backend's pool limit (one GPU step per visible GPU locally; compute.max_parallel_jobs
        # on Slurm/k8s), so `dagster dev` on this home backfills folds in parallel where it can
        from arena_assets.assets.pools import apply_pool_limits

        apply_pool_limits(instance, settings)
        n_dead = _fail_dead_demo_runs(instance)
        if n_dead:
            echo(f"marked {n_dead} run(s) of an earlier, interrupted demo as failed")
        run = materialize_pipeline(defs, instance, partitions=folds, echo=echo, tags={"arena/launcher": "demo"})
    final = artifacts.latest(settings.root, "final_ensemble")
    submission = final / "submission.csv" if final else None
    summary: dict[str, Any] = {
        "settings": str(Path(path).resolve()) if path else None,
        "dagster_home": str(home),
        "artifact_root": str(settings.root),
        "pipeline_wall_s": run.wall_s,
        "wave_s": run.wave_s,
        "runs": len(run.run_ids),
        "defs_load_s": defs_load_s,
        "folds": fold_table(settings),
        "final_submission": str(submission) if submission else None,
        "ensemble_mode": settings.ensemble.mode,
        "truth": score_against_truth(settings, submission) if submission else None,
    }
    artifacts.atomic_write_json(settings.root / SUMMARY_FILE, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["", "fold  cv_logloss_raw  cv_logloss  accuracy  temperature"]
    for r in summary["folds"]:
        lines.append(f"{r['fold']:>4}  {r['cv_logloss_raw']:>14.4f}  {r['cv_logloss']:>10.4f}  "
                     f"{r['cv_accuracy']:>8.4f}  {r['temperature']:>11.3f}")
    if summary["folds"]:
        mean = sum(r["cv_logloss"] for r in summary["folds"]) / len(summary["folds"])
        lines.append(f"mean  {'':>14}  {mean:>10.4f}")
    lines.append("")
    lines.append(f"final submission ({summary['ensemble_mode']}): {summary['final_submission']}")
    if summary.get("truth"):
        t = summary["truth"]
        lines.append(f"known-answer test: expected log-loss {t['expected_logloss']:.4f} "
                     f"(prior {t['prior_logloss']:.4f}, Bayes {t['bayes_logloss']:.4f}), gap closed {t['gap_closed']:.3f}")
    lines.append(f"pipeline: {summary['runs']} Dagster runs in {summary['pipeline_wall_s']:.1f} s")
    lines.append(f"history: DAGSTER_HOME={summary['dagster_home']} dagster dev -h 127.0.0.1")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    home = Path(args.dagster_home or os.environ.get("DAGSTER_HOME") or DEFAULT_HOME)
    folds = [f.strip() for f in args.folds.split(",")] if getattr(args, "folds", None) else None
    summary = run_demo(args.settings, home, folds, bool(getattr(args, "regenerate_sample", False)))
    print(format_summary(summary))
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="arena-assets demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
