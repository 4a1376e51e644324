"""GPU speed, second pass (issue 19): where the packed TTA pass's time goes, and its warm-up.

Phases of ``bench_gpu.py`` (``--phases gemmslab,warmup``), kept here so that file stays readable:

* ``gemmslab`` - the second ceiling: the model's own linear layers (q, k, v, o, gate, up, down of
  one decoder layer) as bare cuBLAS GEMMs at the slab shape (M = slab tokens), median of 20.
  Multiplied by layers x slabs it is the time the TTA pass would take if it were only its GEMMs
  (padding tokens included), so the report splits the gap to the 8192^3 ceiling into "the GEMMs at
  these shapes" and "attention + glue + host gaps".
* ``warmup`` - fresh processes, each its own interpreter (what a Slurm job, a pod or a GPU shard
  is): ``cold`` (empty node-local Inductor cache dir, empty ``InferSettings.compile_cache``
  folder: it compiles and the project's ``gpu/compile_cache.py`` writes torch's portable
  "mega-cache" file there), ``warm_same_dir`` (same Inductor cache dir, no portable file: what
  torch's own disk caches give a later process on the same node) and ``warm_project_cache`` (an
  empty Inductor cache dir, as on a fresh node or pod, plus the compile-cache folder: the project
  loads the file before compiling). Each records model build, first-call warm-up (compile + one slab), dynamo's
  ``compile_times`` and graph counts, then the timed packed TTA pass on ``--rows`` rows. The cold
  process also profiles one pass (torch.profiler: GEMM / flex attention / other kernels / host
  gaps); the last runs the plain HF loop (sdpa, length-sorted, batch 8) a user would pick instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import bench_gpu as B
import numpy as np


class Fmt:
    prompt_max_tokens = 256


def linear_shapes(shape: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear in one Gemma-2 decoder layer."""
    d, ff = shape["hidden_size"], shape["intermediate_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}


def _median_ms(fn: Any, reps: int = 20) -> float:
    import torch

    fn()
    B.sync()
    if not B.cuda():
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return float(np.median(times))


def phase_gemmslab(rec: B.Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    import torch
    import torch.nn.functional as F

    dev = "cuda" if B.cuda() else "cpu"
    res: dict[str, Any] = {"what": "one decoder layer's linears as bare F.linear (cuBLAS) at M = slab tokens, bf16, median of 20"}
    for m in sorted(set(args.slabs + [32768] if not args.tiny else args.slabs)):
        per: dict[str, Any] = {}
        tot_fl, tot_ms = 0.0, 0.0
        x_big = torch.randn(m, max(a for a, _ in linear_shapes(shape).values()), device=dev, dtype=torch.bfloat16)
        for name, (k, n) in linear_shapes(shape).items():
            x = x_big[:, :k].contiguous()
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
            ms = _median_ms(lambda x=x, w=w: F.linear(x, w))
            fl = 2.0 * m * k * n
            per[name] = {"ms": ms, "tflops": fl / ms / 1e9}
            tot_fl += fl
            tot_ms += ms
            del w, x
        res[str(m)] = {"per_linear": per, "layer_ms": tot_ms, "layer_tflops": tot_fl / tot_ms / 1e9,
                       "frac_of_ceiling": tot_fl / tot_ms / 1e9 / ceiling if ceiling else None}
        del x_big
        B.free()
        rec.put("gemmslab", res)
        B.log.info("gemmslab M=%d: layer %.2f ms, %.0f TFLOP/s", m, tot_ms, tot_fl / tot_ms / 1e9)


# ----------------------------------------------------------------------------- warm-up children
def _categorize(name: str) -> str:
    n = name.lower()
    if "flex" in n or "tem_fused" in n or "attention" in n:
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "sm90", "sm80", "ampere", "cublas", "wgmma")):
        return "gemm"
    if n.startswith("triton_") or "triton" in n:
        return "fused_elementwise"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "other"


def profile_pass(fn: Any) -> dict[str, Any]:
    """Kernel time by kind over one call of ``fn`` (torch.profiler, CUDA activity); host gaps =
    wall - kernel time (one stream: kernels do not overlap)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    B.sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        B.sync()
        wall = time.perf_counter() - t0
    kinds: dict[str, float] = {}
    top: list[tuple[str, float, int]] = []
    for ev in prof.key_averages():
        dt = getattr(ev, "device_time_total", None)
        if dt is None:
            dt = getattr(ev, "cuda_time_total", 0)
        if not dt or getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        k = _categorize(ev.key)
        kinds[k] = kinds.get(k, 0.0) + dt / 1e6
        top.append((ev.key[:120], dt / 1e6, ev.count))
    kern = sum(kinds.values())
    top.sort(key=lambda t: -t[1])
    return {"wall_s": wall, "kernel_s": kern, "host_gap_s": max(0.0, wall - kern),
            "share_of_wall": {k: v / wall for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])} | {"host_gap": max(0.0, wall - kern) / wall},
            "top_kernels": [{"name": n, "s": s, "count": c} for n, s, c in top[:25]]}


def phase_warmchild(rec: B.Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    """One fresh process's warm-up and TTA pass (see the module docstring)."""

    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu.formatting import encode_rows
    from arena_assets.gpu.packing import pack_bins, register_attention, tta_logits_packed
    from arena_assets.gpu.predict import tta_logits

    res: dict[str, Any] = {"cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "role": args.child_role}
    rec.put("warmchild", res)
    t_proc = time.perf_counter()
    df, tok = B.synthetic_table(args.rows, seed=1)
    warm_df, _ = B.synthetic_table(max(16, args.rows // 8), seed=2)
    t0 = time.perf_counter()
    model = B.build_model(shape, tok.pad_token_id, register_attention())
    res["build_s"] = time.perf_counter() - t0
    inf = InferSettings(max_length=args.max_length, batch_size=16, tta=True, slab_tokens=args.slabs[0], compile=True,
                        compile_cache=args.project_cache or None)
    _, tw = B.timed(lambda: tta_logits(model, tok, warm_df, Fmt, inf))
    res["warmup_s"] = tw
    res["warm_rows"] = len(warm_df)
    from torch._dynamo.utils import compile_times, counters

    res["compile_times"] = compile_times(repr="str", aggregate=True)[:4000]
    res["dynamo_counters"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "frames", "recompiles", "inductor")}
    rec.put("warmchild", res)
    res["compile_cache"] = getattr(model, "arena_record", {})
    rec.put("warmchild", res)
    # the timed pass: the project's TTA entry point, warm
    ids = encode_rows(df, tok, tok.arena_format, args.max_length, 256)
    L = np.array([len(x) for x in ids])
    fl = float(B.flops_per_row(L, B.n_nonemb(model), shape).sum()) * 2
    swapped = encode_rows(df.rename(columns={"response_a": "response_b", "response_b": "response_a"}), tok, tok.arena_format, args.max_length, 256)
    res["n_slabs"] = len(pack_bins([len(x) for x in ids] + [len(x) for x in swapped], args.slabs[0]))
    runs, runs_first = [], []
    z = z_first = None
    for _ in range(args.child_reps):
        B.free()
        z, t = B.timed(lambda: tta_logits(model, tok, df, Fmt, inf))
        runs.append(t)
        if args.child_ab:  # the same pass encoding the whole table first (the previous code), interleaved
            B.free()
            z_first, t1 = B.timed(lambda: tta_logits_packed(model, tok, df, args.max_length, Fmt.prompt_max_tokens,
                                                              tta=True, slab_tokens=args.slabs[0], chunk_rows=None))
            runs_first.append(t1)
    t = min(runs)
    res["tta"] = {"rows": len(df), "seconds_each": runs, "rows_per_s": len(df) / t, "tokens_per_s": 2 * L.sum() / t,
                  "tflops": fl / t / 1e12, "frac_of_ceiling": fl / t / 1e12 / ceiling if ceiling else None,
                  "peak_gib": B.peak_gib(), "slab_tokens": args.slabs[0], "encoding": "streamed in chunks (packing.CHUNK_ROWS)"}
    if runs_first:
        t1 = min(runs_first)
        _, t_enc = B.timed(lambda: [encode_rows(df, tok, tok.arena_format, args.max_length, Fmt.prompt_max_tokens, swap=s)
                                    for s in (False, True)])
        res["tta_encode_first"] = {
            "seconds_each": runs_first, "rows_per_s": len(df) / t1, "frac_of_ceiling": fl / t1 / 1e12 / ceiling if ceiling else None,
            "streamed_speedup": t1 / t, "host_encode_s": t_enc,
            "max_abs_logit_diff_vs_streamed": float(np.abs(np.asarray(z_first) - np.asarray(z)).max()),
            "note": "the whole table encoded (both orientations), then packed and run: the pass before streaming"}
    res["_logits8"] = np.asarray(z)[:8].round(4).tolist()
    rec.put("warmchild", res)
    if args.child_profile:
        try:
            res["profile"] = profile_pass(lambda: tta_logits(model, tok, df.head(max(8, args.rows // 4)), Fmt, inf))
            if args.child_ab:
                res["profile_encode_first"] = profile_pass(lambda: tta_logits_packed(
                    model, tok, df.head(max(8, args.rows // 4)), args.max_length, Fmt.prompt_max_tokens, tta=True,
                    slab_tokens=args.slabs[0], chunk_rows=None))
        except Exception as e:  # noqa: BLE001 - a profiler failure is recorded, the rest goes on
            B._record_failure(res.setdefault("profile", {}), "profile", e)
        rec.put("warmchild", res)
    if args.child_sdpa:
        # what a user would pick instead: HF's own forward, sdpa, length-sorted, batch 8, padded.
        # sdpa drops Gemma-2's attention softcap: a slightly different function (labelled).
        from arena_assets.gpu.fast import uncompile_layers

        try:
            uncompile_layers(model)
            B.set_attn(model, "sdpa")
            for m in model.modules():  # what HF's sdpa path computes: no attention softcap
                if hasattr(m, "attn_logit_softcapping"):
                    m.attn_logit_softcapping = None
            hf = InferSettings(max_length=args.max_length, batch_size=8, tta=True, sort_by_length=True, compile=False)
            with B.fast_infer(False):  # predict_logits' plain loop: HF's own forward
                _, tws = B.timed(lambda: tta_logits(model, tok, warm_df.head(16), Fmt, hf))
                B.free()
                zs, ts = B.timed(lambda: tta_logits(model, tok, df, Fmt, hf))
            res["hf_sdpa_sorted_b8"] = {
                "seconds": ts, "warmup_s": tws, "rows_per_s": len(df) / ts, "frac_of_ceiling": fl / ts / 1e12 / ceiling if ceiling else None,
                "peak_gib": B.peak_gib(), "softcap": "dropped by sdpa (a slightly different function)",
                "max_abs_logit_diff_vs_packed": float(np.abs(np.asarray(zs)[:8] - np.asarray(z)[:8]).max()),
            }
        except Exception as e:  # noqa: BLE001
            B._record_failure(res.setdefault("hf_sdpa_sorted_b8", {}), "hf_sdpa", e)
        rec.put("warmchild", res)
    if args.extra_slabs and args.child_sdpa:  # back to the project's pass (compiled, arena_flex, softcap)
        from arena_assets.gpu.packing import register_attention as _reg

        for m in model.modules():
            if hasattr(m, "attn_logit_softcapping"):
                m.attn_logit_softcapping = shape["attn_logit_softcapping"]
        B.set_attn(model, _reg())
    for slab in args.extra_slabs:
        try:
            inf2 = InferSettings(max_length=args.max_length, batch_size=16, tta=True, slab_tokens=slab, compile=True)
            _, tw2 = B.timed(lambda i=inf2: tta_logits(model, tok, warm_df, Fmt, i))
            B.free()
            z2, t2 = B.timed(lambda i=inf2: tta_logits(model, tok, df, Fmt, i))
            res[f"tta_slab{slab}"] = {"warmup_s": tw2, "seconds": t2, "rows_per_s": len(df) / t2,
                                      "frac_of_ceiling": fl / t2 / 1e12 / ceiling if ceiling else None, "peak_gib": B.peak_gib(),
                                      "max_abs_logit_diff_vs_slab": float(np.abs(np.asarray(z2) - np.asarray(z)).max())}
        except Exception as e:  # noqa: BLE001
            B._record_failure(res.setdefault(f"tta_slab{slab}", {}), "slab", e)
        rec.put("warmchild", res)
    res["process_s"] = time.perf_counter() - t_proc
    rec.put("warmchild", res)


def phase_warmup(rec: B.Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    """Run the warm-up children one after another (see the module docstring)."""
    root = Path(args.cache_root)
    root.mkdir(parents=True, exist_ok=True)
    shared = ["--project-cache", args.shared_store or str(root / "shared_store")]  # InferSettings.compile_cache
    plan = [
        ("cold", root / "a", [*shared, "--child-profile", "1"]),
        ("warm_same_dir", root / "a", []),
        ("warm_project_cache", root / "b", [*shared, "--child-sdpa", str(args.sdpa), "--child-profile", "1",
                                            "--child-ab", str(args.ab), "--child-reps", str(args.reps),
                                            "--extra-slabs", ",".join(map(str, args.extra_slabs))]),
    ]
    if args.warmup_roles:
        plan = [p for p in plan if p[0] in args.warmup_roles]
    res: dict[str, Any] = {}
    for role, cdir, extra in plan:
        out = Path(args.out) / f"child_{role}"
        cmd = [sys.executable, str(Path(__file__).with_name("bench_gpu.py")), "--phases", "warmchild", "--out", str(out),
               "--rows", str(args.rows), "--max-length", str(args.max_length), "--slabs", ",".join(map(str, args.slabs)),
               "--child-role", role, "--ceiling-value", str(ceiling or 0), *extra]
        if args.tiny:
            cmd.append("--tiny")
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cdir), PYTHONUNBUFFERED="1")
        limit = args.child_timeout * (2 if role == "cold" else 1)
        child = B.run_child(cmd, env, limit, out, "warmchild")
        wall = child["process_wall_s"]
        res[role] = child
        rec.put("warmup", res)
        B.log.info("warmup %s: rc %s, wall %.1f s, warm-up %s s", role, child["rc"], wall, child.get("warmup_s"))


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cache-root", default="/tmp/arena-compile-bench", help="warmup: node-local folder for the children's caches")
    ap.add_argument("--child-role", default="")
    ap.add_argument("--child-profile", type=int, default=0)
    ap.add_argument("--child-sdpa", type=int, default=0)
    ap.add_argument("--child-ab", type=int, default=0, help="children: also time the pass that encodes everything first")
    ap.add_argument("--child-reps", type=int, default=2, help="children: timed passes (min taken)")
    ap.add_argument("--ab", type=int, default=0, help="warmup: --child-ab of the warm_project_cache child")
    ap.add_argument("--reps", type=int, default=2, help="warmup: --child-reps of the warm_project_cache child")
    ap.add_argument("--child-timeout", type=int, default=200, help="per warm child; the cold one gets twice")
    ap.add_argument("--extra-slabs", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    ap.add_argument("--project-cache", default=None, help="InferSettings.compile_cache for the child")
    ap.add_argument("--shared-store", default=None, help="warmup: the InferSettings.compile_cache folder of the children")
    ap.add_argument("--sdpa", type=int, default=1, help="warmup: run the HF sdpa baseline in the last child")
    ap.add_argument("--warmup-roles", type=lambda s: [x for x in s.split(",") if x], default=[])
    ap.add_argument("--ceiling-value", type=float, default=0.0, help="children: the parent's measured ceiling")


PHASES = {"gemmslab": phase_gemmslab, "warmup": phase_warmup, "warmchild": phase_warmchild}
