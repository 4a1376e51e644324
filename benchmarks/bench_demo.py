"""Benchmark of the README's main command: setup, then the whole recipe on the sample (CPU).

Writes ``benchmarks/results/demo.json``:
- ``setup_s``: ``scripts/setup.sh`` (venv and installs; null when the script is absent or
  ``--skip-setup``), measured apart from
- ``wall_s``: the demo itself (``arena-assets demo``: sample, every asset, all folds),
- ``peak_rss_mb``: the peak of the summed RSS of the demo's whole process tree (sampled every
  0.2 s from /proc),
- ``cv_logloss`` per fold, ``gap_closed`` of the final submission against truth.json,
- ``defs_load_s``: loading the definitions in a fresh interpreter (what the code server does).
Targets (issue 5): wall_s <= 600, peak_rss_mb <= 8192, defs_load_s <= 5.

    python3 benchmarks/bench_demo.py [--skip-setup] [--settings arena.yaml]   (any python3: it sets up .venv)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "demo.json"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids = (task / "children").read_text().split()
            out += [int(k) for k in kids]
    except OSError:
        pass
    return out


def tree_rss_mb(root: int) -> float:
    """Summed resident memory of a process and all its descendants."""
    total = 0
    stack = [root]
    seen = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        stack += _children(pid)
    return total / 2**20


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak tree RSS MiB) of a command."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.2)
    return proc.returncode, round(time.time() - t0, 2), round(peak, 1)


def defs_load_s(python: str) -> float:
    code = "import time; t=time.time(); import arena_assets.definitions as d; d.defs.resolve_asset_graph(); print(time.time()-t)"
    r = subprocess.run([python, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return round(float(r.stdout.strip().splitlines()[-1]), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-setup", action="store_true")
    ap.add_argument("--settings", default=None)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("DAGSTER_HOME", str(REPO / ".arena" / "dagster_home"))
    setup_s = None
    if not args.skip_setup and (REPO / "scripts" / "setup.sh").exists():
        rc, setup_s, _ = run_measured(["bash", "scripts/setup.sh"], env)
        if rc != 0:
            print("scripts/setup.sh failed", file=sys.stderr)
            return rc
    python = str(REPO / ".venv" / "bin" / "python")
    cmd = [str(REPO / ".venv" / "bin" / "arena-assets"), "demo"]
    if args.settings:
        cmd += ["--settings", args.settings]
    load_before = os.getloadavg()[0]
    rc, wall, peak = run_measured(cmd, env)
    load_after = os.getloadavg()[0]
    if rc != 0:
        print(f"demo failed (exit {rc})", file=sys.stderr)
        return rc
    # This harness runs under any python3 (it may have to create .venv first): ask the venv.
    settings_arg = args.settings or (str(REPO / "arena.yaml") if (REPO / "arena.yaml").exists() else None)
    root = subprocess.run(
        [python, "-c", "import sys; from arena_assets.core.settings import load_settings; "
                       "print(load_settings(sys.argv[1] if len(sys.argv) > 1 else None).root)",
         *([settings_arg] if settings_arg else [])],
        cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    summary = json.loads((Path(root) / "demo_summary.json").read_text())
    result = {
        "command": "bash scripts/demo.sh",
        "setup_s": setup_s,
        "wall_s": wall,
        "pipeline_wall_s": summary["pipeline_wall_s"],
        "peak_rss_mb": peak,
        "defs_load_s": defs_load_s(python),
        "cv_logloss": {str(r["fold"]): r["cv_logloss"] for r in summary["folds"]},
        "cv_logloss_raw": {str(r["fold"]): r["cv_logloss_raw"] for r in summary["folds"]},
        "gap_closed": (summary.get("truth") or {}).get("gap_closed"),
        "final_expected_logloss": (summary.get("truth") or {}).get("expected_logloss"),
        "ensemble_mode": summary["ensemble_mode"],
        "runs": summary["runs"],
        "wave_s": summary["wave_s"],
        "targets": {"wall_s": 600, "peak_rss_mb": 8192, "defs_load_s": 5},
        "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
