"""Benchmark ``arena-assets validate`` at the real train.csv's scale (57,477 rows, about 184 MB)
and at 200,000 rows (about 640 MB: a train file with external data merged in).

Usage::

    .venv/bin/python benchmarks/bench_validate.py [--rows 57477 200000] [--repeats 3] [--keep DIR]

What it builds: a Kaggle-format train.csv whose rows copy the REAL length distribution. When
``../shared/data/arena-real-sample/train_sample.csv`` exists, each synthetic row takes the turn
count and per-turn character lengths of a real row drawn at random (an empirical bootstrap);
otherwise per-turn lengths are lognormal with the parameters fitted on that sample (log-chars
mean/sd: prompt 4.58/1.32, responses 6.44/1.35) and turn counts from its histogram. Text is
random words with the real data's quirks (non-ASCII written as ``\\uXXXX`` escapes, a surrogate
pair emoji, quotes, newlines, ``null`` turns), so JSON decoding does representative work.

What it measures: ``validate_files(train)`` (read, check, decode every cell, summarize) in a
fresh child process per repeat; the median time gives ``mb_per_s``/``rows_per_s``; the child's
peak RSS (``ru_maxrss``, including the interpreter and pandas/pyarrow) is ``peak_mb``. Also the
end-to-end ``arena-assets validate`` command time (interpreter start + imports included), and
the error path's one extra cost: naming the LINE of a bad row re-reads the file up to that row
(``error_line_lookup_s``, for the last row: the worst case). Targets, at every size: >= 30 MB/s,
peak <= 3x the file. Results: ``benchmarks/results/validate.json`` (one entry per size, and the
machine: CPU model, cores, memory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "arena-real-sample" / "train_sample.csv"
RESULTS = ROOT / "benchmarks" / "results" / "validate.json"
LOGNORMAL = {"prompt": (4.58, 1.32), "response_a": (6.42, 1.36), "response_b": (6.46, 1.34)}
TURN_HIST = {1: 875, 2: 88, 3: 14, 4: 10, 5: 4, 6: 6, 8: 1, 10: 1, 14: 1}
"""Turn counts of the 1000 real rows (fallback when the real sample is absent)."""


def _length_source(rng: np.random.Generator, rows: int) -> tuple[list[tuple[list[int], list[int], list[int]]], str]:
    """Per row: per-turn char lengths of (prompt, response_a, response_b)."""
    cols = ["prompt", "response_a", "response_b"]
    if REAL.exists():
        df = pd.read_csv(REAL, dtype=object, keep_default_na=False)
        real = [tuple([len(t or "") for t in json.loads(r[c])] for c in cols) for _, r in df.iterrows()]
        pick = rng.integers(0, len(real), rows)
        return [real[i] for i in pick], f"empirical bootstrap of {REAL.name} ({len(real)} real rows)"
    counts = np.array(list(TURN_HIST.values()), dtype=float)
    turns = rng.choice(list(TURN_HIST), rows, p=counts / counts.sum())
    out = []
    for n in turns:
        out.append(tuple([int(x) for x in rng.lognormal(*LOGNORMAL[c], int(n))] for c in cols))
    return out, "lognormal fallback (parameters fitted on the real sample)"


def _corpus(rng: np.random.Generator, n_chars: int = 2_000_000) -> str:
    """ASCII text with the real data's escapes: newlines, quotes, backslashes, code fences."""
    words = [w for w in "the of and to in is that for it as with be on not this are by an or code data "
             "model answer question python function return value example list string user".split()]
    special = ['"quoted"', "\\path", "\n", "\n\n", "```", "café"]
    p = np.r_[np.full(len(words), 0.95 / len(words)), np.full(len(special), 0.05 / len(special))]
    vocab = words + special
    picks = rng.choice(len(vocab), n_chars // 4, p=p)
    return " ".join(vocab[i] for i in picks)[:n_chars]


NON_LATIN = " 数据 жизнь 東京 "
"""Inserted into 12 % of turns (Python stores those as 2 bytes per character, as in the real
sample where 12 % of characters sit in such turns); an emoji (4 bytes per character) into 1 %."""


def make_file(path: Path, rows: int, seed: int = 0) -> str:
    """Write the synthetic train.csv; returns where its lengths came from."""
    rng = np.random.default_rng(seed)
    lengths, source = _length_source(rng, rows)
    corpus = _corpus(rng)
    cmax = len(corpus)

    def text(n: int) -> str:
        n = min(n, cmax - 1)
        s = int(rng.integers(0, cmax - n))
        t = corpus[s : s + n]
        u = rng.random()
        if u < 0.01:
            t = t[: n // 2] + " 😀 " + t[n // 2 :]
        elif u < 0.13:
            t = t[: n // 2] + NON_LATIN + t[n // 2 :]
        return t

    ids = rng.choice(np.arange(2**31, 2**31 + 40 * rows), rows, replace=False)
    data: dict[str, list] = {"id": [str(i) for i in ids], "model_a": [], "model_b": [], "prompt": [],
                             "response_a": [], "response_b": []}
    for p, a, b in lengths:
        data["model_a"].append("model-x")
        data["model_b"].append("model-y")
        for c, ls in (("prompt", p), ("response_a", a), ("response_b", b)):
            turns = [None if (c != "prompt" and rng.random() < 0.002) else text(n) for n in ls]
            data[c].append(json.dumps(turns))
    k = rng.choice(3, rows, p=[0.35, 0.34, 0.31])
    for j, c in enumerate(["winner_model_a", "winner_model_b", "winner_tie"]):
        data[c] = (k == j).astype(int)
    pd.DataFrame(data).to_csv(path, index=True, lineterminator="\n")  # with pandas' unnamed index
    return source


CHILD = r"""
import json, os, sys, time
def hwm():
    # VmHWM is this process's own peak RSS; ru_maxrss would inherit the parent's peak on fork
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
t0 = time.perf_counter()
from arena_assets.core.contract import validate_files
base = hwm()
t1 = time.perf_counter(); c1 = os.times()
r = validate_files(sys.argv[1])
t2 = time.perf_counter(); c2 = os.times()
cpu = (c2.user - c1.user) + (c2.system - c1.system)
print(json.dumps({"import_s": t1 - t0, "validate_s": t2 - t1, "cpu_s": cpu, "rows": r["train"]["rows"],
                  "base_rss_mb": base, "peak_mb": hwm()}))
"""


LOOKUP = r"""
import json, sys, time
from pathlib import Path
from arena_assets.core.contract import _CsvLines
t = time.perf_counter()
line = _CsvLines(Path(sys.argv[1])).line_of_row(int(sys.argv[2]))
print(json.dumps({"line": line, "s": time.perf_counter() - t}))
"""


def run_child(path: Path, code: str = CHILD, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, str(path), *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/meminfo") as f:
        mem_gb = round(int(next(ln for ln in f if ln.startswith("MemTotal:")).split()[1]) / 2**20, 1)
    return {"description": f"{os.cpu_count()}-core CPU ({cpu}), {mem_gb} GiB RAM, shared with other jobs",
            "cpus": os.cpu_count(), "cpu_model": cpu, "mem_gib": mem_gb, "python": platform.python_version(),
            "platform": platform.platform()}


def bench_size(rows: int, repeats: int, tmpdir: Path) -> tuple[dict, bool]:
    path = tmpdir / f"train_{rows}.csv"
    t = time.perf_counter()
    source = make_file(path, rows)
    print(f"generated {path} in {time.perf_counter() - t:.1f}s", flush=True)
    mb = path.stat().st_size / 1e6
    load0 = round(os.getloadavg()[0], 2)
    runs = [run_child(path) for _ in range(repeats)]
    peaks = [r["peak_mb"] for r in runs]
    secs = float(np.median([r["validate_s"] for r in runs]))
    cpu_s = float(np.median([r["cpu_s"] for r in runs]))
    exe = Path(sys.executable).with_name("arena-assets")
    t = time.perf_counter()
    cli = subprocess.run([str(exe), "validate", "--train", str(path)], capture_output=True, text=True, check=False)
    cli_s = time.perf_counter() - t
    lookup = run_child(path, LOOKUP, str(rows - 1))
    result = {
        "rows": runs[0]["rows"],
        "mb": round(mb, 1),
        "seconds": round(secs, 3),
        "mb_per_s": round(mb / secs, 1),
        "rows_per_s": round(runs[0]["rows"] / secs),
        "peak_mb": round(max(peaks), 1),
        "peak_over_file": round(max(peaks) / mb, 2),
        "interpreter_and_imports_rss_mb": round(runs[0]["base_rss_mb"], 1),
        "cli_wall_s": round(cli_s, 2),
        "cli_exit_code": cli.returncode,
        "repeats": [round(r["validate_s"], 3) for r in runs],
        "best_mb_per_s": round(mb / min(r["validate_s"] for r in runs), 1),
        "load_avg_1min_at_start": load0,
        "cpu_s": round(cpu_s, 3),
        "mb_per_cpu_s": round(mb / cpu_s, 1),
        "error_line_lookup_s": round(lookup["s"], 2),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "lengths": source,
        "meets_targets": bool(mb / secs >= 30 and max(peaks) <= 3 * mb),
    }
    print(json.dumps(result, indent=2), flush=True)
    path.unlink()
    return result, cli.returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[57477, 200000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", default=None, help="folder to generate the files in (default: a temp folder)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    tmpdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_validate_"))
    tmpdir.mkdir(parents=True, exist_ok=True)
    sizes, ok = [], True
    for rows in args.rows:
        r, good = bench_size(rows, args.repeats, tmpdir)
        sizes.append(r)
        ok = ok and good
    result = {
        "sizes": sizes,
        "note": "per size: seconds = median wall time of validate_files in a fresh process (imports "
        "excluded); peak_mb = that process's VmHWM, interpreter and imports included; the machine's "
        "cores may be shared with other jobs (see cpu_s and the load average); error_line_lookup_s = "
        "extra time an error at the LAST row spends naming its line (error path only); best_mb_per_s = "
        "the fastest repeat (least disturbed by other jobs)",
        "targets": {"mb_per_s": ">= 30", "peak_mb": "<= 3x file"},
        "machine": machine(),
        "pandas": pd.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
