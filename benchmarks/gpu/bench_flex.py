"""flex_attention at Gemma-2-9B's head dim 256 on packed slabs: kernel configurations compared.

Why: the H200 profile of the packed TTA pass (docs/gpu.md, issue 19) gave flex attention 15 % of
the time for about 1.4 % of the pass's FLOPs, i.e. the attention kernel runs near a tenth of the
matmul ceiling, and the first compile of the pass took 239 s, almost all of it Triton compiling
kernels. Inductor's default flex forward configuration on sm90 at head dim 256 is small
(BLOCK_M 64, BLOCK_N 32, 3 stages, 4 warps). This phase measures, per ``kernel_options``
configuration, each in a fresh process with empty Inductor and Triton caches (what a new node or
pod pays):

* the cold compile of ``torch.compile(flex_attention)`` (first call, the BlockMask's own compile
  timed apart),
* the kernel time on real packed slabs (the arena length mix, the project's ``packing.pack_bins``
  and ``packing.packed_masks``; the softcap ``score_mod``; GQA 16/8 heads), median of 10 per slab,
* the useful FLOPs per second (QK^T and AV inside each row's causal triangle only; x3.5 with
  the backward) as a fraction of the matmul ceiling measured in the same call,
* the largest difference of its output (and, with the backward, dQ) from the default
  configuration's on the same inputs.

Phases of ``bench_gpu.py``: ``flexprobe`` (parent: builds the slabs, runs the children in turn
within ``--flex-budget`` seconds, compares) and ``flexchild`` (one configuration).
``--flex-mode fwd`` is inference (TTA's slab of 16384 tokens), ``fwdbwd`` training (4 rows of
2000 tokens, forward + backward).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bench_gpu as B
import numpy as np

DEFAULT_CONFIGS = {
    "default": {},
    "m128n64w8s2": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    "m128n32w8s2": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    "m128n64w8s1": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1},
    "m64n64w4s2": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "m128n128w8s1": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 1},
    "m128n64w8s2_tma": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "USE_TMA": True},
    "default_safe": {"ROWS_GUARANTEED_SAFE": True},
}


def _slab_docs(args: argparse.Namespace, shape: dict[str, Any]) -> list[np.ndarray]:
    """Per slab, the token lengths of its rows: TTA slabs of the real length mix (both
    orientations, as the pass packs them), or training slabs of 4 rows of 2000 tokens."""
    from arena_assets.gpu.formatting import encode_rows
    from arena_assets.gpu.packing import pack_bins

    if args.flex_mode == "fwdbwd":
        n = 500 if args.tiny else 2000
        return [np.full(4, n, dtype=np.int64) for _ in range(args.flex_slabs)]
    df, tok = B.synthetic_table(args.rows, seed=1)
    L = np.array([len(x) for x in encode_rows(df, tok, tok.arena_format, args.max_length, 256)])
    both = np.concatenate([L, L])
    bins = pack_bins(both, args.slabs[0])
    return [both[b] for b in bins[: args.flex_slabs]]


def _packed(lens: np.ndarray, total: int, dev: str) -> Any:
    from arena_assets.gpu.packing import pack

    rows = [[1] * int(n) for n in lens]
    p = pack(rows, pad_id=0, total=total)
    return p.to(dev)


def phase_flexchild(rec: B.Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    """One ``kernel_options`` configuration in this (fresh) process."""
    import bench_tta2
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from arena_assets.gpu.packing import ATTN_NAME, _softcap_mod, packed_masks

    cfg = json.loads(args.flex_config)
    res: dict[str, Any] = {"kernel_options": cfg, "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    rec.put("flexchild", res)
    dev = "cuda" if B.cuda() else "cpu"
    data = json.loads(Path(args.flex_data).read_text())
    slabs = [np.asarray(x, dtype=np.int64) for x in data["slabs"]]
    total = int(data["total"])
    H, KV, D = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    shim = SimpleNamespace(config=SimpleNamespace(_attn_implementation=ATTN_NAME, sliding_window=shape["sliding_window"], head_dim=D,
                                                  layer_types=["sliding_attention", "full_attention"]))
    t0 = time.perf_counter()
    masks = [packed_masks(shim, _packed(s, total, dev))["full_attention"] for s in slabs]
    B.sync()
    res["masks_s"] = time.perf_counter() - t0
    g = torch.Generator(device=dev).manual_seed(0)
    dt = torch.bfloat16
    train = args.flex_mode == "fwdbwd"

    def rnd(h: int) -> Any:
        return torch.randn((1, h, total, D), generator=g, device=dev, dtype=dt).requires_grad_(train)

    q, k, v = rnd(H), rnd(KV), rnd(KV)
    grad = torch.randn((1, H, total, D), generator=g, device=dev, dtype=dt) if train else None
    f = torch.compile(flex_attention, dynamic=False)
    score_mod = _softcap_mod(shape["attn_logit_softcapping"])
    scale = shape["query_pre_attn_scalar"] ** -0.5
    opts = cfg or None

    def call(bm: Any) -> Any:
        if train:
            q.grad = k.grad = v.grad = None
            o = f(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=opts)
            o.backward(grad)
            return o
        with torch.inference_mode():
            return f(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=opts)

    t0 = time.perf_counter()
    try:
        o = call(masks[0])
        B.sync()
    except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory) is a result
        B._record_failure(res, "compile", e)
        rec.put("flexchild", res)
        return
    res["compile_s"] = time.perf_counter() - t0
    rec.put("flexchild", res)
    if args.flex_save:
        keep = {"out": o[0, :, : min(total, 4096)].detach().float().cpu()}
        if train:
            keep["dq"] = q.grad[0, :, : min(total, 4096)].float().cpu()
        torch.save(keep, args.flex_save)
    per_slab = []
    for bm in masks:
        per_slab.append(bench_tta2._median_ms(lambda b=bm: call(b), reps=3 if args.tiny else 10))
    fl = [4.0 * H * D * float((s * (s + 1) / 2).sum()) * (3.5 if train else 1.0) for s in slabs]
    tf = [x / (ms / 1e3) / 1e12 for x, ms in zip(fl, per_slab)]
    res.update({"ms_per_slab": per_slab, "ms_median": float(np.median(per_slab)), "tflops_per_slab": tf,
                "tflops_total": sum(fl) / (sum(per_slab) / 1e3) / 1e12,
                "frac_of_ceiling": sum(fl) / (sum(per_slab) / 1e3) / 1e12 / ceiling if ceiling else None,
                "peak_gib": B.peak_gib()})
    rec.put("flexchild", res)


def phase_flexprobe(rec: B.Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    """Each mode of ``--flex-mode`` (comma-separated) with its own budget (``--flex-budget``)."""
    modes = args.flex_mode.split(",")
    budgets = [float(x) for x in str(args.flex_budget).split(",")]
    for i, mode in enumerate(modes):
        _probe(rec, argparse.Namespace(**{**vars(args), "flex_mode": mode, "flex_budget": budgets[min(i, len(budgets) - 1)]}),
               shape, ceiling)
    fwd = rec.data.get("flexprobe_fwd", {})
    if args.flex_adopt and fwd.get("best"):
        # the later phases' children (warmup, train) run the project's pass with the fastest forward
        # configuration, through the same switch a user has (packing.KERNEL_OPTIONS_ENV)
        from arena_assets.gpu.packing import KERNEL_OPTIONS_ENV

        opts = {f"fwd_{k}": v for k, v in fwd["configs"][fwd["best"]].get("kernel_options", {}).items()}
        os.environ[KERNEL_OPTIONS_ENV] = json.dumps(opts)
        fwd["adopted"] = {KERNEL_OPTIONS_ENV: os.environ[KERNEL_OPTIONS_ENV]}
        rec.put("flexprobe_fwd", fwd)


def _probe(rec: B.Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    """Run every configuration's child in turn (see the module docstring)."""
    import torch

    root = Path(args.cache_root) / f"flex_{args.flex_mode}"
    root.mkdir(parents=True, exist_ok=True)
    slabs = _slab_docs(args, shape)
    total = args.slabs[0] if args.flex_mode == "fwd" else -(-int(slabs[0].sum()) // 128) * 128
    data = root / "slabs.json"
    data.write_text(json.dumps({"slabs": [s.tolist() for s in slabs], "total": total}))
    configs = json.loads(args.flex_configs) if args.flex_configs else dict(DEFAULT_CONFIGS)
    if args.flex_mode == "fwdbwd":
        # training: Inductor's default, then the forward's best (keys prefixed "fwd_": unprefixed
        # num_warps/num_stages would also set the backward kernels'), then that with 8-warp backward
        best = rec.data.get("flexprobe_fwd", {}).get("best")
        fwd = {f"fwd_{k}": v for k, v in rec.data.get("flexprobe_fwd", {}).get("configs", {}).get(best, {}).get("kernel_options", {}).items()}
        configs = {"default": {}}
        if fwd:
            configs["fwd_best"] = fwd
            configs["fwd_best_bwd_w8"] = {**fwd, "bwd_num_warps": 8}
    res: dict[str, Any] = {"mode": args.flex_mode, "slab_tokens": total, "n_slabs": len(slabs),
                           "rows_per_slab": [len(s) for s in slabs],
                           "real_tokens_per_slab": [int(s.sum()) for s in slabs], "configs": {}}
    rec.put(f"flexprobe_{args.flex_mode}", res)
    t_start = time.perf_counter()
    for name, cfg in configs.items():
        left = args.flex_budget - (time.perf_counter() - t_start)
        if left < 30:
            res["configs"][name] = {"skipped": f"budget ({args.flex_budget} s) spent"}
            continue
        out = root / f"out_{name}"  # not under --out: the device returns few files; the parent keeps the record
        cdir = root / name
        cmd = [sys.executable, str(Path(__file__).with_name("bench_gpu.py")), "--phases", "flexchild", "--out", str(out),
               "--flex-config", json.dumps(cfg), "--flex-data", str(data), "--flex-mode", args.flex_mode,
               "--flex-save", str(root / f"{name}.pt"), "--ceiling-value", str(ceiling or 0)]
        if args.tiny:
            cmd.append("--tiny")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}  # Inductor's own, under cdir
        env.update(TORCHINDUCTOR_CACHE_DIR=str(cdir), PYTHONUNBUFFERED="1")
        child = B.run_child(cmd, env, min(args.flex_child_timeout, left), out, "flexchild")
        rc = child["rc"]
        res["configs"][name] = child
        rec.put(f"flexprobe_{args.flex_mode}", res)
        B.log.info("flex %s %s: rc %s compile %s s, %s ms/slab, frac %s", args.flex_mode, name, rc,
                   child.get("compile_s"), child.get("ms_median"), child.get("frac_of_ceiling"))
    ref_path = root / "default.pt"
    if ref_path.exists():
        ref = torch.load(ref_path)
        for name in configs:
            pth = root / f"{name}.pt"
            if name != "default" and pth.exists():
                got = torch.load(pth)
                res["configs"][name]["max_abs_diff_vs_default"] = {
                    k: float((got[k] - ref[k]).abs().max()) for k in ref if k in got}
    ok = {n: c for n, c in res["configs"].items() if c.get("ms_median")}
    if ok:
        best = min(ok, key=lambda n: ok[n]["ms_median"])
        res["best"] = best
        if "default" in ok:
            res["best_over_default_speed"] = ok["default"]["ms_median"] / ok[best]["ms_median"]
    res["wall_s"] = time.perf_counter() - t_start
    rec.put(f"flexprobe_{args.flex_mode}", res)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--flex-mode", default="fwd", help="fwd, fwdbwd or both (comma-separated)")
    ap.add_argument("--flex-configs", default="", help="forward: JSON {name: kernel_options}; default: DEFAULT_CONFIGS "
                    "(fwdbwd always compares Inductor's default with the forward's best)")
    ap.add_argument("--flex-slabs", type=int, default=4, help="slabs timed per configuration")
    ap.add_argument("--flex-budget", default="480", help="seconds for all children of a mode (one per mode, comma-separated)")
    ap.add_argument("--flex-child-timeout", type=float, default=150.0)
    ap.add_argument("--flex-adopt", type=int, default=0, help="later phases use the forward's best configuration")
    ap.add_argument("--flex-config", default="{}", help="child: its kernel_options")
    ap.add_argument("--flex-data", default="", help="child: the parent's slabs.json")
    ap.add_argument("--flex-save", default="", help="child: where to save its output sample")


PHASES = {"flexprobe": phase_flexprobe, "flexchild": phase_flexchild}
