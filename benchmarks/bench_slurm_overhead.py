"""What the Slurm backend adds over a plain ``sbatch --wait`` of the same function.

Three ways to run the same Dagster-free step (``bench_step``: writes result.json, nothing else):

- ``sbatch_s``: ``sbatch --wait`` of ``python -c 'bench_step(...)'`` directly (the floor: Slurm's
  own scheduling + Python start-up + imports);
- ``dagster_s``: an in-process ``dagster.materialize`` of an asset that calls the step through
  ``ComputeResource(backend="slurm")`` -> ``SlurmBackend`` (submitit pickling, sbatch, sacct
  polling every ``poll_s``, log streaming, result read-back, sacct facts);
- ``launched_s``: ``dagster asset materialize`` from the CLI (adds loading the code location and
  a fresh Python process with Dagster).

``added_s = dagster_s - sbatch_s`` (target <= 3 s). Medians of ``--repeat`` runs. Needs the
cluster of scripts/slurm-up.sh. Writes benchmarks/results/slurm_overhead.json.

    .venv/bin/python benchmarks/bench_slurm_overhead.py [--repeat 5] [--poll-s 0.5]
"""

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

import dagster as dg

from arena_assets.core.artifacts import new_version_dir, set_latest
from arena_assets.core.results import StepResult, step_output
from arena_assets.resources.compute import ComputeResource
from arena_assets.resources.settings import SettingsResource

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def bench_step(*, out_dir: Path) -> StepResult:
    """The smallest real step: a result.json with one metric, staged and renamed into place."""
    with step_output(out_dir, "bench") as (tmp, res):
        res.metrics["one"] = 1.0
    return res


@dg.asset
def bench_asset(context: dg.AssetExecutionContext, compute: ComputeResource) -> dg.MaterializeResult:
    out_dir = new_version_dir(compute.settings.get().root, "bench_asset")
    res = compute.run(context, "bench", bench_step, out_dir=out_dir)
    set_latest(res.out_dir)
    return dg.MaterializeResult(metadata={"job_id": str(res.info["compute"]["job_id"])})


defs = dg.Definitions(assets=[bench_asset], resources={"compute": ComputeResource(settings=SettingsResource(), backend="slurm")})


def _time_sbatch(work: Path, i: str, wait: bool = True) -> float:
    """``sbatch --wait`` (wait=True; sbatch itself polls every few seconds), or ``sbatch`` then a
    0.1 s ``sacct`` poll until the job ends (wait=False: the tight floor)."""
    out_dir = work / "sbatch" / i
    code = f"import bench_slurm_overhead as b; b.bench_step(out_dir={str(out_dir)!r})"
    cmd = ["sbatch", "--parsable", "-c", "1", "--mem=1G", "-t", "5", "-J", "bench-sbatch",
           "-o", str(work / f"sbatch-{i}.log"), "--wrap", f"{sys.executable} -c {json.dumps(code)}"]
    t0 = time.perf_counter()
    if wait:
        subprocess.run([cmd[0], "--wait", *cmd[1:]], check=True, capture_output=True)
    else:
        jid = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
        while True:
            st = subprocess.run(["sacct", "-j", jid, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True).stdout.strip()
            if st and st.split()[0] not in {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING"}:
                break
            time.sleep(0.1)
    dt = time.perf_counter() - t0
    assert (out_dir / "result.json").exists(), "the sbatch job did not run the step"
    return dt


def _time_materialize() -> float:
    # the module imported by name (not __main__), so the job imports the step like sbatch's does
    import bench_slurm_overhead as mod

    t0 = time.perf_counter()
    res = dg.materialize([mod.bench_asset], resources=mod.defs.resources, instance=dg.DagsterInstance.ephemeral())
    dt = time.perf_counter() - t0
    assert res.success
    return dt


def _time_launched(work: Path, i: int) -> float:
    dagster = str(Path(sys.executable).with_name("dagster"))
    t0 = time.perf_counter()
    subprocess.run([dagster, "asset", "materialize", "-m", "bench_slurm_overhead", "--select", "bench_asset"],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--poll-s", type=float, default=0.5)
    ap.add_argument("--out", default=str(HERE / "results" / "slurm_overhead.json"))
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    settings = work / "arena.yaml"
    settings.write_text(json.dumps({
        "artifact_root": str(work / "artifacts"),
        "compute": {"backend": "slurm", "slurm": {"poll_s": a.poll_s},
                    "needs": {"bench": {"cpus": 1, "mem_gb": 1, "time_min": 5}}},
    }))
    os.environ["ARENA_SETTINGS"] = str(settings)
    os.environ["DAGSTER_HOME"] = str(work / "dagster_home")
    (work / "dagster_home").mkdir()
    (work / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    sys.path.insert(0, str(HERE))
    import logging

    logging.getLogger("dagster").setLevel(logging.WARNING)
    os.environ.setdefault("DAGSTER_CLI_LOG_LEVEL", "WARNING")

    _time_sbatch(work, "warm", wait=False)  # warm-up: page cache, slurmd
    samples: dict[str, list[float]] = {"sbatch_s": [], "sbatch_poll_s": [], "dagster_s": [], "launched_s": []}
    for i in range(a.repeat):  # interleaved, so drifts hit every variant alike
        samples["sbatch_s"].append(_time_sbatch(work, str(i)))
        samples["sbatch_poll_s"].append(_time_sbatch(work, f"p{i}", wait=False))
        samples["dagster_s"].append(_time_materialize())
        samples["launched_s"].append(_time_launched(work, i))
    med = {k: round(statistics.median(v), 3) for k, v in samples.items()}
    version = subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip()
    out = {
        **med,
        "added_s": round(med["dagster_s"] - med["sbatch_s"], 3),
        "added_vs_poll_floor_s": round(med["dagster_s"] - med["sbatch_poll_s"], 3),
        "target_added_s": 3.0,
        "repeat": a.repeat,
        "poll_s": a.poll_s,
        "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
        "slurm": version,
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": (
            "medians; the same step function in every variant; local single-node Slurm (scripts/slurm-up.sh). "
            "sbatch --wait polls the controller every few seconds, so sbatch_s is a coarse floor; "
            "sbatch_poll_s (sbatch + a 0.1 s sacct poll) is the tight one. launched_s adds a CLI process "
            "that loads Dagster and the code location."
        ),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
