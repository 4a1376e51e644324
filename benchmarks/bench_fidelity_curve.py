"""Teacher-only learning curve on the interactions task, fold 0 (docs/fidelity.md, "P3").

A diagnostic, not a result of the recipe: how the benchmark's teacher (Gemma-2 3 layers x 192, full
fine-tuning, the settings of ``bench_fidelity.TASK_SETTINGS``) improves on its held-out fold with
more external rows drawn from the same truth. No KD student is trained and nothing is compared
with one.

It reads an earlier ``bench_fidelity.py`` run's work folder (``--source``, default the V3 run's
``/tmp/fid-v2/known``): its settings, fold 0's ``fold_data`` (1600 train / 400 held-out rows), its
``external_pairs`` table (the 4000 external rows of the seed-11 sample), the teacher family's
post-pretrained base (step 1, reused for every N), and ``truth.json``. For each N it calls the
recipe's own steps, as the ``teacher_model`` / ``teacher_oof_probs`` assets do:
``gpu.train.train_teacher`` (fold 0's train rows + the first N external rows) and
``gpu.predict.teacher_oof`` (TTA on the held-out fold). Scored as the benchmark scores teachers:
expected log-loss against the held-out rows' truth, raw and after the per-fold temperature the
V3 KD step fits on the fold's labels (``gpu.train.calibrated_teacher_logits``).

External rows beyond 4000: ``make_sample`` cannot extend the seed-11 sample (the ids of all rows
are drawn first, so a larger ``external_rows`` changes every row, train included). The first 4000
are therefore exactly the benchmark's; rows 4001.. are the external rows of a second sample of the
same task and generator (``--extra-seed``, default 12, no train/test rows), read by the recipe's
``contract.read_external``. Ids are checked disjoint from every train/test/external id of seed 11.

``--layers/--width``: a larger teacher (a new family; its base post-pretrained by
``gpu.pretrain.post_pretrain`` with the benchmark's settings on the same 4000 external pairs).

    .venv/bin/python benchmarks/bench_fidelity.py --no-real --calibrate-teacher --work /tmp/fid-v2   # the source run, ~31 min
    .venv/bin/python benchmarks/bench_fidelity_curve.py --n 4000 12000 28000 [--layers 4 --width 256]
    .venv/bin/python benchmarks/bench_fidelity_curve.py --summary   # paired differences, extrapolation, time
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "fidelity_learning_curve.json"
FOLD = 0


def latest(root: Path, key: str, part: str = "_") -> Path:
    from arena_assets.core import artifacts

    v = artifacts.latest(root, key, None if part == "_" else part)
    if v is None:
        raise FileNotFoundError(f"{root}: no {key}[{part}]")
    return Path(v)


def external_table(src: Path, work: Path, n: int, extra_seed: int) -> Path:
    """A table of the first ``n`` external rows: the benchmark's 4000, then the extra sample's."""
    import pandas as pd

    from arena_assets.core import contract
    from arena_assets.core.sample import make_sample

    base = latest(src / "artifacts", "external_pairs") / "table.parquet"
    ext = contract.read_table(base)
    if n <= len(ext):
        if n == len(ext):
            return base  # the benchmark's own table, byte for byte
        out = work / f"external_{n}.parquet"
        contract.write_table(ext.iloc[:n].reset_index(drop=True), out)
        return out
    extra_dir = work / f"extra_seed{extra_seed}"
    need = n - len(ext)
    have = json.loads((extra_dir / "truth.json").read_text())["rows"]["external"] if (extra_dir / "truth.json").exists() else 0
    if have < need:
        make_sample(extra_dir, train_rows=0, test_rows=0, external_rows=max(need, 56000), seed=extra_seed,
                    task="interactions")
    extra = contract.read_external(extra_dir / "external.csv")
    truth = json.loads((src / "inputs" / "truth.json").read_text())
    seen = {i for split in ("train", "test", "external") for i in truth[split]}
    clash = seen & set(extra["id"].astype(str))
    if clash:
        raise ValueError(f"{len(clash)} extra external ids clash with the seed-11 sample")
    both = pd.concat([ext, extra.iloc[:need]], ignore_index=True)
    out = work / f"external_{n}.parquet"
    contract.write_table(both, out)
    return out


def larger_family(src: Path, work: Path, layers: int, width: int) -> tuple[str, Path, Any]:
    """Settings with a family ``gemma_L{layers}x{width}`` and its post-pretrained base (step 1)."""
    from arena_assets.core.settings import load_settings
    from arena_assets.gpu.pretrain import post_pretrain

    fam = f"gemma_L{layers}x{width}"
    cfg = yaml.safe_load((src / "arena.yaml").read_text())
    heads = width // 32
    cfg["families"][fam] = {"tiny": {"arch": "gemma2", "num_hidden_layers": layers, "hidden_size": width,
                                     "num_attention_heads": heads, "num_key_value_heads": 2, "head_dim": 32,
                                     "intermediate_size": 2 * width}}
    cfg["teacher_families"] = [fam]
    cfg["artifact_root"] = str(src / "artifacts")
    for k in ("train_csv", "test_csv", "external", "truth_json"):
        cfg["data"][k] = str(src / cfg["data"][k])
    path = work / f"arena_{fam}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    s = load_settings(str(path))
    base = work / f"{fam}_post_pretrained_base"
    if not (base / "result.json").exists():
        arts = src / "artifacts"
        ext = latest(arts, "external_pairs") / "table.parquet"
        corpus = [latest(arts, "train_table") / "table.parquet", latest(arts, "test_table") / "table.parquet", ext]
        t0 = time.time()
        post_pretrain(s.families[fam], s.post_pretrain, s.fmt, ext, corpus, out_dir=base)
        print(f"post-pretrained {fam} in {time.time() - t0:.1f}s", flush=True)
    return fam, base / "model", s


def point(src: Path, work: Path, n: int, extra_seed: int, layers: int | None, width: int | None) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from arena_assets.core import metrics, quality
    from arena_assets.core.contract import read_table
    from arena_assets.core.settings import load_settings
    from arena_assets.gpu.data import teacher_logits_for
    from arena_assets.gpu.formatting import labels_of
    from arena_assets.gpu.predict import teacher_oof
    from arena_assets.gpu.train import calibrated_teacher_logits, train_teacher

    arts = src / "artifacts"
    if layers:
        fam, base, s = larger_family(src, work, layers, width or 192)
        base_info = {"post_pretrained": str(base.parent), "reused_from_benchmark": False}
    else:
        s = load_settings(str(src / "arena.yaml"))
        fam = s.teacher_families[0]
        base = latest(arts, f"{fam}/post_pretrained_base") / "model"
        base_info = {"post_pretrained": str(base.parent), "reused_from_benchmark": True}
    fold = latest(arts, "fold_data", str(FOLD))
    tr, va = fold / "train.parquet", fold / "valid.parquet"
    ext = external_table(src, work, n, extra_seed)
    tag = f"{fam}_n{n}"
    tdir, odir = work / tag / "teacher", work / tag / "oof"
    for d in (tdir, odir):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    print(f"[{time.strftime('%H:%M:%S')}] {tag}: training", flush=True)
    t0 = time.time()
    res = train_teacher(base, s.teacher, s.fmt, tr, va, ext, out_dir=tdir)
    train_s = time.time() - t0
    t1 = time.time()
    teacher_oof(tdir / "model", s.fmt, s.infer, va, FOLD, fam, out_dir=odir, max_length=s.teacher.oof_length)
    oof_s = time.time() - t1
    oof = pd.read_parquet(odir / "oof.parquet")
    valid = read_table(va)
    train_all = read_table(latest(arts, "train_table") / "table.parquet")
    truth = quality.load_truth(src / "inputs" / "truth.json")
    ids = oof["id"].astype(str).tolist()
    ref = quality.reference(truth["train"], ids)
    vlab = labels_of(valid.assign(id=valid["id"].astype(str)).set_index("id").loc[ids].reset_index())
    z, _, folds = teacher_logits_for(oof, ids, [fam])
    zc, temps = calibrated_teacher_logits(z, folds, vlab)
    raw = metrics.expected_log_loss(ref, quality.frame_probs(oof))
    cal = metrics.expected_log_loss(ref, quality.softmax(zc[:, 0].astype(np.float64), 1.0))
    prior_vec = labels_of(train_all).mean(axis=0)  # the benchmark's prior: the train label frequencies
    prior = metrics.expected_log_loss(ref, np.tile(prior_vec, (len(ref), 1)))
    bayes = metrics.entropy(ref)
    hist = res.info.get("train", {}) if res is not None else {}
    return {
        "n_external": n, "rows_trained": int(res.info["train_rows"]), "external_rows_used": int(res.info["external_rows"]),
        "teacher": {"family": fam, **{k: v for k, v in s.families[fam].tiny.model_dump().items()
                                      if k in ("arch", "num_hidden_layers", "hidden_size", "intermediate_size")},
                    "params": res.info["model"]["params"], "lora": s.teacher.lora.enabled,
                    "lr": s.teacher.train.learning_rate, "epochs": s.teacher.train.num_epochs,
                    "batch": s.teacher.train.per_device_batch_size, "scheduler": s.teacher.train.lr_scheduler},
        "base": base_info, "fold": FOLD, "heldout_rows": len(ids),
        "heldout_truth_raw": raw, "heldout_truth_calibrated": cal, "temperature": temps[0][str(FOLD)],
        "heldout_prior": prior, "heldout_bayes": bayes,
        "gap_closed_raw": metrics.gap_closed(raw, prior, bayes), "gap_closed_calibrated": metrics.gap_closed(cal, prior, bayes),
        "valid_logloss_labels_no_tta": res.metrics.get("valid_logloss"), "global_step": hist.get("global_step"),
        "train_s": round(train_s, 1), "oof_s": round(oof_s, 1),
        "machine": "2 shared CPU cores", "load_avg": list(os.getloadavg()),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _row_loss(oof_path: Path, truth: dict[str, Any]) -> tuple[list[str], Any]:
    """(ids, per-row expected log-loss against the truth) of a teacher OOF parquet."""
    import numpy as np
    import pandas as pd

    from arena_assets.core import quality

    o = pd.read_parquet(oof_path)
    ids = o["id"].astype(str).tolist()
    ref = quality.reference(truth["train"], ids)
    return ids, -(ref * np.log(quality.frame_probs(o))).sum(1)


def _paired(d: Any) -> dict[str, float]:
    """Mean of per-row differences on the same rows, with its standard error."""
    import numpy as np

    return {"raw_diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}


V3_REST_S = 1859.2 - 474.7
"""V3's full benchmark (fidelity.json ``wall_s``, 1859 s) less its five teachers' training (474.7 s,
their ``teacher_model`` result.json ``timings.wall_s``; their OOF inference, 20 s, stays in)."""
BUDGET_S = 45 * 60


def summary(body: dict[str, Any], work: Path, src: Path, family: str = "gemma_large", target: float = 0.75) -> dict[str, Any]:
    """Paired differences between consecutive N (same 400 rows), two extrapolations of the
    calibrated gap closed to ``target`` (labelled as such), and the benchmark time they imply."""
    import numpy as np
    import pandas as pd
    from scipy.optimize import curve_fit

    from arena_assets.core import quality

    truth = quality.load_truth(src / "inputs" / "truth.json")
    pts = sorted([p for p in body["points"] if p["teacher"]["family"] == family], key=lambda p: p["rows_trained"])
    out: dict[str, Any] = {"family": family, "paired": []}
    prev = None
    for p in pts:
        _, loss = _row_loss(work / f"{family}_n{p['n_external']}" / "oof" / "oof.parquet", truth)
        if prev is not None:
            out["paired"].append({"from": prev[0], "to": p["n_external"], **_paired(loss - prev[1])})
        prev = (p["n_external"], loss)
    rows = np.array([p["rows_trained"] for p in pts], dtype=np.float64)
    gap = np.array([p["gap_closed_calibrated"] for p in pts])
    secs = np.array([p["train_s"] for p in pts])
    s_per_row = float(np.polyfit(rows, secs, 1)[0]) if len(pts) > 1 else float(secs[0] / rows[0])
    icept = float(np.polyfit(rows, secs, 1)[1]) if len(pts) > 1 else 0.0

    def bench_s(r: float) -> float:
        return V3_REST_S + 5 * (icept + s_per_row * r)

    ex: dict[str, Any] = {}
    if len(pts) >= 2:  # straight line in log(rows) through the last two points
        slope = (gap[-1] - gap[-2]) / np.log(rows[-1] / rows[-2])
        r = float(rows[-1] * np.exp((target - gap[-1]) / slope)) if slope > 0 else None
        ex["log_linear_last_two"] = {"gain_per_doubling": float(slope * np.log(2)), "rows_for_target": r,
                                     "benchmark_min": bench_s(r) / 60 if r else None}
    if len(pts) >= 4:  # saturating power law a - b * rows^-c through every point
        try:
            f = lambda x, a, b, c: a - b * np.power(x / 1e4, -c)
            (a, b, c), _ = curve_fit(f, rows, gap, p0=(0.7, 0.2, 0.7), maxfev=20000)
            r = float(1e4 * (b / (a - target)) ** (1 / c)) if a > target and b > 0 and c > 0 else None
            ex["power_law_all"] = {"asymptote": float(a), "b": float(b), "c": float(c), "rows_for_target": r,
                                   "benchmark_min": bench_s(r) / 60 if r else None,
                                   "max_abs_residual": float(np.max(np.abs(f(rows, a, b, c) - gap)))}
        except RuntimeError as e:
            ex["power_law_all"] = {"error": str(e)}
    out["extrapolation_to_target"] = ex
    out["target_gap_closed"] = target
    out["train_s_per_row"] = s_per_row
    out["train_s_intercept"] = icept
    out["benchmark_min_at_point"] = {str(p["n_external"]): (V3_REST_S + 5 * p["train_s"]) / 60 for p in pts}
    others = {}  # other teacher sizes against this family at the same N (same 400 rows)
    for q in body["points"]:
        if q["teacher"]["family"] == family:
            continue
        same = [p for p in pts if p["n_external"] == q["n_external"]]
        if same:
            ids, a = _row_loss(work / f"{q['teacher']['family']}_n{q['n_external']}" / "oof" / "oof.parquet", truth)
            b_ids, b = _row_loss(work / f"{family}_n{q['n_external']}" / "oof" / "oof.parquet", truth)
            b = pd.Series(b, index=b_ids).loc[ids].to_numpy()
            pd_ = _paired(a - b)
            others[f"{q['teacher']['family']}_n{q['n_external']}"] = {
                "raw_diff_vs_" + family: pd_["raw_diff"], "se": pd_["se"],
                "benchmark_min_if_teachers": (V3_REST_S + 5 * q["train_s"]) / 60}
    out["other_sizes"] = others
    out["budget_min"] = BUDGET_S / 60
    out["rows_per_teacher_within_budget"] = (BUDGET_S - V3_REST_S - 5 * icept) / 5 / s_per_row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="/tmp/fid-v2/known")
    ap.add_argument("--work", default="/tmp/fid-curve")
    ap.add_argument("--n", type=int, nargs="+", default=[4000, 12000, 28000])
    ap.add_argument("--extra-seed", type=int, default=12)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--summary", action="store_true", help="only (re)compute the summary of the points in --out")
    args = ap.parse_args()
    from arena_assets.core.artifacts import atomic_write_text

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    src, work = Path(args.source), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    body = json.loads(out.read_text()) if out.exists() else {"points": []}
    if args.summary:
        body["summary"] = summary(body, work, src)
        atomic_write_text(out, json.dumps(body, indent=1, default=float) + "\n")
        print(json.dumps(body["summary"], indent=1, default=float))
        return 0
    for n in args.n:
        p = point(src, work, n, args.extra_seed, args.layers, args.width)
        p["command"] = " ".join([".venv/bin/python", "benchmarks/bench_fidelity_curve.py", *sys.argv[1:]])
        body["points"] = [q for q in body["points"]
                          if not (q["n_external"] == n and q["teacher"]["family"] == p["teacher"]["family"])] + [p]
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(body, indent=1, default=float) + "\n")  # earlier points survive a crash
        print(json.dumps({k: p[k] for k in ("n_external", "rows_trained", "heldout_truth_raw", "heldout_truth_calibrated",
                                            "gap_closed_raw", "gap_closed_calibrated", "temperature", "train_s")}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
