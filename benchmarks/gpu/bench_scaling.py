"""Data-parallel scaling on one host (issue 9): the same code on 1 and on N GPUs, under torchrun.

    torchrun --nproc_per_node=1 benchmarks/gpu/bench_scaling.py --mode tta   --out $OUT
    torchrun --nproc_per_node=2 benchmarks/gpu/bench_scaling.py --mode tta   --out $OUT
    torchrun --nproc_per_node=2 benchmarks/gpu/bench_scaling.py --mode train --out $OUT

* ``tta``: every rank takes its shard of the rows (``fast.shard_rows``: balanced by length, or
  strided with ``--shard strided`` as call 9 measured) and runs the
  project's TTA pass on it (no communication); rows/s = all rows / the slowest rank's time.
* ``train``: the project's ``ArenaTrainer`` + ``_training_args`` on the Gemma-2-9B shape with
  LoRA r=64 (all linear); under torchrun the Trainer wraps the model in DDP itself (one rank per
  GPU, gradients all-reduced over NCCL). tokens/s = world x micro-batch x L / median step time.

Rank 0 writes ``<out>/scaling_<mode>_<world>.json``; ``summarize.py`` divides the N-GPU rate by
N x the 1-GPU rate. Attention and batch shapes are flags so the 1- and N-GPU runs match exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import bench_gpu as B  # noqa: E402


def _dist() -> tuple[int, int, int]:
    import torch
    import torch.distributed as dist

    rank, world, local = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local


def _max_over_ranks(x: float) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return x
    t = torch.tensor([x], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _gather(x: float, world: int) -> list[float]:
    """Every rank's value of ``x`` (rank order), on every rank."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return [x]
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [float(o.item()) for o in out]


def run_tta(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    """The project's TTA path per rank: ``predict.tta_logits`` (packed, compiled, streamed encoding
    with ``--attn arena_flex``) on this rank's shard (``fast.shard_rows``, balanced by characters as
    ``predict.sharded_tta_logits`` does); ``--compile-cache``: ``InferSettings.compile_cache`` (rank 0
    compiles and writes it, the others wait and load; a later process loads it). Records each rank's
    warm-up and finish time, so the shards' imbalance is visible."""
    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu.fast import shard_rows
    from arena_assets.gpu.predict import tta_logits

    class Fmt:
        prompt_max_tokens = 256

    shape = B.TINY if args.tiny else B.GEMMA2_9B
    df, tok = B.synthetic_table(args.rows, seed=1)
    chars = None
    if args.shard == "balanced":  # by characters of the three spans (a proxy of tokens)
        chars = (df["prompt"].str.len() + df["response_a"].str.len() + df["response_b"].str.len()).to_numpy()
    rows = shard_rows(len(df), rank, world, chars)
    mine = df.iloc[rows].reset_index(drop=True)
    warm, _ = B.synthetic_table(32, seed=2)
    model = B.build_model(shape, tok.pad_token_id, B._attn(args.attn))
    inf = InferSettings(max_length=args.max_length, batch_size=16, tta=True, slab_tokens=args.slab,
                        compile_cache=args.compile_cache)
    B.sync()
    t0 = time.perf_counter()
    tta_logits(model, tok, warm, Fmt, inf, rank=rank)  # warm-up: compile, or load the cache
    B.sync()
    warmup_s = time.perf_counter() - t0
    _barrier()
    B.sync()
    t0 = time.perf_counter()
    tta_logits(model, tok, mine, Fmt, inf, rank=rank)
    B.sync()
    mine_s = time.perf_counter() - t0
    finish = _gather(mine_s, world)
    warmups = _gather(warmup_s, world)
    shard_chars = _gather(float(chars[rows].sum()) if chars is not None else float(len(mine)), world)
    slowest = max(finish)
    return {"rows": len(df), "shard": args.shard, "rows_this_rank": len(mine), "seconds_this_rank": mine_s, "seconds_slowest": slowest,
            "rank_seconds": finish, "rank_finish_spread": (max(finish) - min(finish)) / slowest if slowest else None,
            "rank_warmup_s": warmups, "rank_shard_chars": shard_chars, "compile_cache": args.compile_cache,
            "compile_record": {k: v for k, v in getattr(model, "arena_record", {}).items() if "compile" in k},
            "rows_per_s": len(df) / slowest, "attn": args.attn, "peak_gib": B.peak_gib()}


def run_train(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from arena_assets.core.settings import TrainSettings
    from arena_assets.gpu.data import PairDataset
    from arena_assets.gpu.train import _make_trainer_cls, _training_args, make_collator

    shape = B.TINY if args.tiny else B.GEMMA2_9B
    L, bs = args.seq_len, args.micro_batch
    model = B.build_model(shape, 0, B._attn(args.attn))
    torch.manual_seed(1234)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=64, lora_alpha=128, lora_dropout=0.0,
                                             target_modules="all-linear"))
    rng = np.random.default_rng(0)
    n = bs * args.steps * world * args.grad_accum
    ds = PairDataset(rng.integers(10, shape["vocab_size"], size=(n, L)).tolist(), np.eye(3)[rng.integers(0, 3, size=n)],
                     np.log(rng.dirichlet([1, 1, 1], size=(n, 2))).astype(np.float32))
    pack = args.packing
    cfg = TrainSettings(learning_rate=5e-5, warmup_steps=0, per_device_batch_size=bs, grad_accum=args.grad_accum, max_steps=args.steps,
                        max_length=L, bf16=True, gradient_checkpointing=False, logging_steps=10_000,
                        group_by_length=False, packing=pack, packing_slab_tokens=-(-bs * L // 128) * 128 if pack else None)
    targs = _training_args(cfg, f"/tmp/scaling_scratch_{rank}", save=False, has_eval=False)

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            B.sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            B.sync()
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    kd = {"alpha": 0.5, "temperature": 2.0, "label_smoothing": 0.05, "mse_weight": 0.0, "cos_weight": 0.0}
    trainer = _make_trainer_cls()(model=model, args=targs, train_dataset=ds, data_collator=make_collator(cfg, 0), kd=kd,
                                  callbacks=[timer])
    trainer.train()
    step = float(np.median(timer.times[2:])) if len(timer.times) > 2 else float("nan")
    step = _max_over_ranks(step)
    return {"seq_len": L, "micro_batch_per_gpu": bs, "attn": args.attn, "packing": pack, "step_times_s": timer.times,
            "grad_accum": args.grad_accum, "median_step_s": step,
            "tokens_per_s": world * bs * args.grad_accum * L / step, "ddp": world > 1,
            "model_class": type(trainer.model_wrapped).__name__, "peak_gib": B.peak_gib()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["tta", "train"], required=True)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench_scaling"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=2000)
    ap.add_argument("--attn", default="eager")
    ap.add_argument("--slab", type=int, default=16384)
    ap.add_argument("--compile-cache", default=None, help="tta: InferSettings.compile_cache (node-local folder)")
    ap.add_argument("--tag", default="", help="suffix of the result file's name (e.g. _cold)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--shard", choices=["strided", "balanced"], default="balanced",
                    help="tta: strided rows or token-balanced shards (fast.shard_rows); call 9 measured strided")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step (DDP all-reduces once per step; 1st place: global batch 64)")
    args = ap.parse_args()
    rank, world, _ = _dist()
    out = (run_tta if args.mode == "tta" else run_train)(args, rank, world)
    out.update(world=world, mode=args.mode, versions=B.versions() if rank == 0 else None,
               date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        f = Path(args.out) / f"scaling_{args.mode}_{world}{args.tag}.json"
        f.write_text(json.dumps(out, indent=2, default=str))
        print(f"scaling {args.mode} world={world}:", {k: v for k, v in out.items() if k not in ("versions", "step_times_s")})
    _barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
