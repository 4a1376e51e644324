"""A 5-fold backfill on the real Slurm cluster through the Dagster daemon: parallel vs serialized.

Both variants run the same thing: a fresh deployment (tests/harness: temporary DAGSTER_HOME with
the project's dagster.yaml, ``dagster-daemon run``, the code location tests/slurm/slurm_defs.py),
then ``dagster job backfill -j fold_sleep_job --partitions 0,1,2,3,4``: five runs, each one step
that runs as one Slurm job sleeping ``--sleep-s`` seconds (1 CPU, 1 GB).

- ``parallel``: ``arena-assets pools --apply`` (pool ``slurm`` limit = compute.max_parallel_jobs,
  8): every run starts, all five jobs are submitted at once and Slurm places them;
- ``serialized``: pool ``slurm`` limit 1 -- what the shipped ``default_limit: 1`` did to every
  backend before pools were named per backend (one job at a time).

Wall time: from the backfill command to the last run's end. Overlap from ``sacct``
Submit/Start/End of the five jobs (1 s resolution). A job-array variant (SlurmBackend.map in one
run over all folds) is not measured: one run materializing five partitions records one metadata
set for all of them, so per-fold facts (job id, node, CV metrics) would not survive.

    .venv/bin/python benchmarks/bench_slurm_backfill.py [--sleep-s 30] [--repeat 1]
Writes benchmarks/results/slurm_backfill.json. Needs the cluster of scripts/slurm-up.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SLURM_TESTS = REPO / "tests" / "slurm"
sys.path.insert(0, str(REPO))

from tests.harness import DaemonHarness

FOLDS = ["0", "1", "2", "3", "4"]


def _sacct(job_ids: list[str]) -> dict[str, dict[str, str]]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,NodeList,Submit,Start,End"],
                         capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        p = line.split("|")
        if len(p) == 6:
            rows[p[0]] = dict(zip(["JobID", "State", "NodeList", "Submit", "Start", "End"], p))
    return rows


def _t(s: str) -> float:
    return time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%S"))


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    ev = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    best = cur = 0
    for _, d in ev:
        cur += d
        best = max(best, cur)
    return best


def run_variant(name: str, work: Path, sleep_s: float, pool_limit: int | None) -> dict[str, Any]:
    import dagster as dg

    root = work / name
    root.mkdir(parents=True)
    settings = root / "arena.yaml"
    settings.write_text(json.dumps({
        "artifact_root": str(root / "artifacts"),
        "compute": {"backend": "slurm", "slurm": {"poll_s": 0.5, "folder": str(root / "submitit")},
                    "needs": {"demo": {"cpus": 1, "mem_gb": 1, "time_min": 10}}},
    }))
    pythonpath = os.pathsep.join(p for p in [str(SLURM_TESTS), str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    h = DaemonHarness(root / "deploy", module="slurm_defs", location_name="slurm_defs",
                      env={"ARENA_SETTINGS": str(settings), "ARENA_TEST_SLEEP_S": str(sleep_s),
                           "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"})
    h.start()
    try:
        if pool_limit is None:
            applied = h.apply_pools()["slurm"]["after"]
        else:
            h.set_pool_limit("slurm", pool_limit)
            applied = pool_limit
        t0 = time.time()
        bf = h.backfill("fold_sleep_job", FOLDS)
        runs = h.wait_runs_finished(h.backfill_runs(bf, n=5), timeout=3600)
        recs = [h.instance().get_run_record_by_id(r.run_id) for r in runs]
        wall = max(r.end_time for r in recs) - t0
        statuses = sorted({r.status.value for r in runs})
        job_ids = []
        for k in FOLDS:
            rec = h.instance().fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("fold_demo"), asset_partitions=[k]), limit=1).records
            job_ids.append(str(rec[0].asset_materialization.metadata["job_id"].value) if rec else "")
    finally:
        h.stop()
    facts = _sacct([j for j in job_ids if j])
    spans = [(_t(facts[j]["Start"]), _t(facts[j]["End"])) for j in job_ids if j in facts]
    submits = [_t(facts[j]["Submit"]) for j in job_ids if j in facts]
    first_end = min(e for _, e in spans)
    return {
        "pool_limit": applied,
        "wall_s": round(wall, 1),
        "run_statuses": statuses,
        "max_jobs_running_at_once": _max_overlap(spans),
        "all_submitted_before_first_end": max(submits) < first_end,
        "submit_spread_s": max(submits) - min(submits),
        "jobs": [
            {"fold": k, "job_id": j, "state": facts[j]["State"], "submit_s": _t(facts[j]["Submit"]) - t0,
             "start_s": _t(facts[j]["Start"]) - t0, "end_s": _t(facts[j]["End"]) - t0}
            for k, j in zip(FOLDS, job_ids) if j in facts
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sleep-s", type=float, default=30.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "slurm_backfill.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    results: dict[str, list[dict[str, Any]]] = {"parallel": [], "serialized": []}
    for i in range(a.repeat):  # interleaved, so drifts hit both variants alike
        results["parallel"].append(run_variant(f"parallel{i}", work, a.sleep_s, None))
        print("parallel", json.dumps(results["parallel"][-1]), flush=True)
        results["serialized"].append(run_variant(f"serialized{i}", work, a.sleep_s, 1))
        print("serialized", json.dumps(results["serialized"][-1]), flush=True)
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in results.items()}
    node = subprocess.run(["sinfo", "-h", "-o", "%N %c CPUs %m MB"], capture_output=True, text=True,
                          check=False).stdout.strip()
    out = {
        "parallel_wall_s": med["parallel"],
        "serialized_wall_s": med["serialized"],
        "speedup": round(med["serialized"] / med["parallel"], 2),
        "sleep_s_per_fold": a.sleep_s,
        "folds": len(FOLDS),
        "repeat": a.repeat,
        "runs": results,
        "slurm": subprocess.run(["sinfo", "--version"], capture_output=True, text=True, check=False).stdout.strip(),
        "slurm_node": node,
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": (
            "5-fold job backfill through dagster-daemon (queued run coordinator, project dagster.yaml), one Slurm "
            "job per fold (1 CPU, sleeps sleep_s_per_fold). parallel: pool 'slurm' limit from "
            "`arena-assets pools --apply`; serialized: pool limit 1 (the old default_limit applied to the Slurm "
            "backend). The single-node test cluster has as many CPUs as the machine, so Slurm itself runs at most "
            "that many 1-CPU jobs at once: max_jobs_running_at_once is Slurm's placement, not Dagster's limit. "
            "Job-array variant not measured: per-fold metadata would not survive a one-run multi-partition "
            "materialization."
        ),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
