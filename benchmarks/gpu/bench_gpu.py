"""GPU speed of the project's own gpu/ code paths on the Gemma-2-9B student shape (issue 9).

One process runs the chosen phases and writes ``<out>/gpu_raw.json`` after each one, so a run cut
off at the device's time limit still returns what it measured. Phases:

* ``ceiling`` - the card's bf16 matmul rate (8192^3, random data, rotating inputs, median).
* ``tta``     - TTA inference on the real length distribution (benchmarks/gpu/arena_lengths.json):
                naive (dataset order, batch 8, pad to longest, eager), the project's
                ``predict.tta_logits`` with arena_flex (packed slabs, gpu/packing.py; ``packed``,
                ``packed_compiled``), and the older token-budget variants of ``gpu/fast.py``.
* ``train``   - the student's LoRA step (r=64, alpha=128, all-linear) through the project's
                ``ArenaTrainer``, ``_training_args`` and ``make_collator`` (bf16; packed / compiled
                per config flags).
* ``int8``    - bitsandbytes LLM.int8 vs bf16 at batch 8 x 2000: throughput and peak memory.
* ``gptq``    - GPTQ 8-bit through GPTQModel's QuantLinear (benchmarks/gpu/gptq_random.py) vs bf16.
* ``fp8``     - ``fast.fp8_linearize`` (torch._scaled_mm, e4m3) vs bf16 (``--fp8-compiled-only``:
                both with compiled layers on the TTA rows).
* ``fp8fid``  - FP8 vs bf16 probabilities on the fidelity benchmark's trained student (``--fid-dir``).

Random-init weights: speed and memory do not depend on weight values. ``--tiny`` runs the same
code on a tiny Gemma-2 on CPU (a dry run before spending device time; its numbers mean nothing).

FLOPs (useful work, padding not counted): per row of L tokens,
  inference 2*N*L + 4*layers*heads*head_dim*L*(L+1)/2   (N = non-embedding parameters; attention
  QK^T and AV over the causal context), training 3x that (forward + backward, recompute not counted).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from arena_assets.core.metrics import softmax  # noqa: E402 - after the sys.path insert

log = logging.getLogger("bench_gpu")

FLOPS_FORMULA = (
    "inference FLOPs per row of L tokens = 2*N_nonemb*L + 4*n_layers*n_heads*head_dim*L*(L+1)/2 "
    "(N_nonemb = parameters of all linear layers outside the embedding, incl. the 3-class head; "
    "attention = QK^T and AV over the causal context, 2 FLOPs per multiply-add); training = 3x the "
    "inference FLOPs (6*N_nonemb*L + backward of attention), gradient-checkpointing recompute not "
    "counted; only real (unpadded) tokens counted. frac_of_ceiling = (FLOPs / wall time) / "
    "bf16 matmul ceiling measured in the same call."
)

GEMMA2_9B = dict(
    vocab_size=256000,
    hidden_size=3584,
    intermediate_size=14336,
    num_hidden_layers=42,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
    query_pre_attn_scalar=256,
    max_position_embeddings=8192,
)
TINY = dict(
    vocab_size=12000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
    query_pre_attn_scalar=16,
    max_position_embeddings=8192,
)


# ----------------------------------------------------------------------------- helpers
class Recorder:
    """Results dict written to disk after every phase (a cut-off run keeps what it measured)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.data: dict[str, Any] = {}
        out.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        tmp = self.out / "gpu_raw.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.out / "gpu_raw.json")


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_child(cmd: list[str], env: dict[str, str], timeout: float, out: Path, key: str) -> dict[str, Any]:
    """Run a phase in a fresh interpreter (``cmd`` writes ``out/gpu_raw.json``) and return its
    record ``key`` with ``process_wall_s``, ``rc`` and, on a failure, the output's tail: what a
    Slurm job, a pod or a GPU shard starts from (empty caches unless ``env`` points at some)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True, check=False)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-1500:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e)[-500:]
    try:
        child = json.loads((out / "gpu_raw.json").read_text()).get(key, {})
    except Exception:  # noqa: BLE001 - the child died before writing
        child = {}
    child.update({"process_wall_s": time.perf_counter() - t0, "rc": rc})
    if rc != 0 or "error" in child:
        child["tail"] = tail
    return child


def versions() -> dict[str, Any]:
    import torch
    import transformers

    v: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }
    for mod in ("peft", "accelerate", "triton", "bitsandbytes", "torchao"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - absent packages are a fact to record
            v[mod] = f"absent ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        v["gpu"] = p.name
        v["gpu_mem_gib"] = round(p.total_memory / 2**30, 1)
        v["sm_count"] = p.multi_processor_count
        v["gpus_visible"] = torch.cuda.device_count()
        try:
            v["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
        except Exception as e:  # noqa: BLE001
            v["driver"] = f"unknown ({e})"
    return v


# ----------------------------------------------------------------------------- ceiling
def matmul_ceiling(n: int, reps: int = 30) -> dict[str, Any]:
    """bf16 n^3 matmul rate through torch (cuBLAS), random inputs rotated over 3 sets, median."""
    import torch

    dev = "cuda" if cuda() else "cpu"
    dt = torch.bfloat16
    sets = [(torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)) for _ in range(3)]
    for a, b in sets:
        a @ b
    sync()
    times = []
    for i in range(reps):
        a, b = sets[i % 3]
        if dev == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            a @ b
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"n": n, "median_s": med, "tflops": 2 * n**3 / med / 1e12, "min_s": float(min(times)), "reps": reps}


# ----------------------------------------------------------------------------- model / data
def _attn(impl: str) -> str:
    """Register ``arena_flex`` with transformers when asked for."""
    if impl == "arena_flex":
        from arena_assets.gpu.packing import register_attention

        register_attention()
    return impl


def set_attn(model: Any, impl: str) -> None:
    """Switch the attention implementation of a built model (eager / flex_attention / sdpa)."""
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(impl)
            return
        except Exception as e:  # noqa: BLE001 - fall back to the config switch
            log.warning("set_attn_implementation(%s) failed (%s); setting config", impl, e)
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None:
            cfg._attn_implementation = impl


def build_model(shape: dict[str, Any], pad_id: int, attn: str, seed: int = 0) -> Any:
    """Random-init Gemma-2 3-class sequence classifier, built directly on the GPU in bf16."""
    import torch
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    from arena_assets.gpu.models import ID2LABEL, NUM_LABELS

    cfg = Gemma2Config(
        **shape,
        pad_token_id=pad_id,
        num_labels=NUM_LABELS,
        id2label=ID2LABEL,
        label2id={v: k for k, v in ID2LABEL.items()},
    )
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    dev = torch.device("cuda" if cuda() else "cpu")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:
            model = Gemma2ForSequenceClassification(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    return model


def n_nonemb(model: Any) -> int:
    """Parameters of all linear layers outside the embedding (what the 2N/6N convention counts)."""
    import torch

    return int(
        sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n)
    )


def flops_per_row(L: np.ndarray, n_lin: int, shape: dict[str, Any]) -> np.ndarray:
    L = np.asarray(L, dtype=np.float64)
    attn = 4.0 * shape["num_hidden_layers"] * shape["num_attention_heads"] * shape["head_dim"] * L * (L + 1) / 2
    return 2.0 * n_lin * L + attn


def synthetic_table(n_rows: int, seed: int, vocab_words: int = 3000) -> tuple[Any, Any]:
    """Rows whose spans have the real sample's token counts (chars/4), as random words, and a
    word-level tokenizer (the project's ``train_word_tokenizer``) trained on them: one word = one
    token, so the project's encoder and truncation see the real length distribution."""
    import pandas as pd

    from arena_assets.gpu.formatting import TINY_FORMAT, corpus_texts
    from arena_assets.gpu.models import train_word_tokenizer

    spec = json.loads((ROOT / "benchmarks/gpu/arena_lengths.json").read_text())
    lens = np.asarray(spec["lengths"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(lens), size=n_rows, replace=n_rows > len(lens))

    def text(k: int) -> str:
        return " ".join(f"w{j}" for j in rng.integers(0, vocab_words, size=int(k)))

    rows = [
        {"id": str(i), "prompt": json.dumps([text(p)]), "response_a": json.dumps([text(a)]), "response_b": json.dumps([text(b)])}
        for i, (p, a, b) in enumerate(lens[pick])
    ]
    df = pd.DataFrame(rows)
    vocab = pd.DataFrame(
        {c: [json.dumps([" ".join(f"w{j}" for j in range(vocab_words))])] for c in ("prompt", "response_a", "response_b")}
    )
    tok = train_word_tokenizer(corpus_texts([vocab], TINY_FORMAT), vocab_size=4 * vocab_words + 64)
    tok.arena_format = TINY_FORMAT
    return df, tok


# ----------------------------------------------------------------------------- TTA
@contextmanager
def fast_infer(on: bool) -> Iterator[None]:
    """``ARENA_FAST_INFER`` for the block: off = ``predict.tta_logits``' plain fixed-batch loop
    (what HF's forward does), on = its CUDA delegation to the packed/fast passes."""
    old = os.environ.get("ARENA_FAST_INFER")
    os.environ["ARENA_FAST_INFER"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ARENA_FAST_INFER", None)
        else:
            os.environ["ARENA_FAST_INFER"] = old


def timed(fn: Any) -> tuple[Any, float]:
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def phase_tta(rec: Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    import torch

    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu.fast import tta_logits_fast
    from arena_assets.gpu.formatting import encode_rows
    from arena_assets.gpu.predict import tta_logits

    class Fmt:
        prompt_max_tokens = 256

    df, tok = synthetic_table(args.rows, seed=1)
    warm_df, _ = synthetic_table(max(16, args.rows // 8), seed=2)
    ids = encode_rows(df, tok, tok.arena_format, args.max_length, 256)
    L = np.array([len(x) for x in ids])
    model = build_model(shape, tok.pad_token_id, args.fast_attn)
    n_lin = n_nonemb(model)
    fl = float(flops_per_row(L, n_lin, shape).sum()) * 2  # TTA: both orientations, same lengths
    res: dict[str, Any] = {
        "rows": int(len(df)),
        "length_source": "real sample (../shared/data/arena-real-sample) span chars / 4, synthetic words, "
        "project tokenizer+encode_rows (prompt cap 256, longer response trimmed first), max_length "
        f"{args.max_length}",
        "tokens_per_row_mean": float(L.mean()),
        "tokens_per_row_p50_p90_max": [float(np.percentile(L, 50)), float(np.percentile(L, 90)), int(L.max())],
        "n_nonemb": n_lin,
        "tflop_per_tta_pass": fl / 1e12,
        "variants": {},
    }
    rec.put("tta", res)

    def run(name: str, attn: str, fn: Any, warm: Any, plain_loop: bool = False) -> None:
        # plain_loop: predict.tta_logits without its CUDA delegation to gpu/fast (ARENA_FAST_INFER=0),
        # i.e. the fixed-batch predict_logits loop with the given batch size and ordering
        with fast_infer(not plain_loop):
            try:
                set_attn(model, attn)
                free()
                _, tw = timed(warm)
                free()
                z, t = timed(fn)
                v = {
                    "attn": attn,
                    "seconds": t,
                    "warmup_seconds": tw,
                    "rows_per_s": len(df) / t,
                    "tokens_per_s": 2 * L.sum() / t,
                    "tflops": fl / t / 1e12,
                    "frac_of_ceiling": fl / t / 1e12 / ceiling if ceiling else None,
                    "peak_gib": peak_gib(),
                }
                res["variants"][name] = v
                res.setdefault("_logits", {})[name] = np.asarray(z)[:8].round(4).tolist()
                log.info("tta %s: %s", name, {k: v[k] for k in ("seconds", "rows_per_s", "frac_of_ceiling")})
            except Exception as e:  # noqa: BLE001 - record and go on to the next variant
                res["variants"][name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
                log.error("tta %s failed: %s", name, e)
        rec.put("tta", res)

    fastkw = {"max_rows": args.max_rows, "pad_multiple": args.pad_multiple}
    res["fast_settings"] = fastkw
    naive = InferSettings(max_length=args.max_length, batch_size=8, tta=True, sort_by_length=False)
    proj = InferSettings(max_length=args.max_length, batch_size=16, tta=True, sort_by_length=True)
    want = args.tta_variants
    if "naive" in want:
        run("naive_eager_order_b8", "eager",
            lambda: tta_logits(model, tok, df, Fmt, naive),
            lambda: tta_logits(model, tok, warm_df.head(16), Fmt, naive), plain_loop=True)
    if "project_eager" in want:
        run("project_eager_sorted_b16", "eager",
            lambda: tta_logits(model, tok, df, Fmt, proj),
            lambda: tta_logits(model, tok, warm_df, Fmt, proj), plain_loop=True)
    if "project_flex" in want:
        run("project_flex_sorted_b16", "flex_attention",
            lambda: tta_logits(model, tok, df, Fmt, proj),
            lambda: tta_logits(model, tok, warm_df, Fmt, proj), plain_loop=True)
    if "project_tta" in want:  # what predict.tta_logits does now on CUDA (delegates to gpu/fast defaults)
        run(f"project_tta_{args.fast_attn}", args.fast_attn,
            lambda: tta_logits(model, tok, df, Fmt, proj),
            lambda: tta_logits(model, tok, warm_df, Fmt, proj))
    if "fast" in want:
        for budget in args.token_budgets:
            run(f"fast_{args.fast_attn}_budget{budget}_pad{args.pad_multiple}", args.fast_attn,
                lambda b=budget: tta_logits_fast(model, tok, df, args.max_length, 256, max_tokens=b, **fastkw),
                lambda b=budget: tta_logits_fast(model, tok, warm_df, args.max_length, 256, max_tokens=b, **fastkw))
    if "fast_flex" in want:
        b = args.token_budgets[0]
        run(f"fast_flex_attention_budget{b}_pad128", "flex_attention",
            lambda: tta_logits_fast(model, tok, df, args.max_length, 256, max_tokens=b, max_rows=args.max_rows, pad_multiple=128),
            lambda: tta_logits_fast(model, tok, warm_df, args.max_length, 256, max_tokens=b, max_rows=args.max_rows, pad_multiple=128))
    if "packed" in want or "packed_compiled" in want:
        # the project's predict.tta_logits with arena_flex: packed slabs (gpu/packing.py)
        from arena_assets.gpu.fast import compile_layers, uncompile_layers
        from arena_assets.gpu.packing import register_attention

        attn = register_attention()
        for stage in [v for v in ("packed", "packed_compiled") if v in want]:
            if stage == "packed_compiled":
                t0 = time.perf_counter()
                set_attn(model, attn)
                compile_layers(model, dynamic=False)
                res["compile_call_seconds_packed"] = time.perf_counter() - t0
            for slab in args.slabs:
                inf = InferSettings(max_length=args.max_length, batch_size=16, tta=True, slab_tokens=slab)
                run(f"{stage}_{attn}_slab{slab}", attn,
                    lambda i=inf: tta_logits(model, tok, df, Fmt, i),
                    lambda i=inf: tta_logits(model, tok, warm_df, Fmt, i))
        if "packed_compiled" in want:
            uncompile_layers(model)  # back to plain modules for any later variant
    if "compiled" in want:
        from arena_assets.gpu.fast import compile_layers

        set_attn(model, args.fast_attn)
        t0 = time.perf_counter()
        compile_layers(model)
        res["compile_call_seconds"] = time.perf_counter() - t0
        for budget in args.token_budgets:
            run(f"fast_{args.fast_attn}_budget{budget}_pad{args.pad_multiple}_compiled", args.fast_attn,
                lambda b=budget: tta_logits_fast(model, tok, df, args.max_length, 256, max_tokens=b, **fastkw),
                lambda b=budget: tta_logits_fast(model, tok, warm_df, args.max_length, 256, max_tokens=b, **fastkw))
    # same-result check: the fast path must give the project's logits (bf16 rounding aside)
    lg = res.get("_logits", {})
    refname = next((k for k in ("naive_eager_order_b8", "project_flex_sorted_b16", "project_eager_sorted_b16") if k in lg), None)
    if refname:
        ref = np.asarray(lg[refname])
        res["max_abs_logit_diff_vs_" + refname] = {
            k: float(np.abs(np.asarray(v) - ref).max()) for k, v in lg.items() if k != refname
        }
    rec.put("tta", res)
    del model
    free()


# ----------------------------------------------------------------------------- train
def phase_train(rec: Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import TrainerCallback

    from arena_assets.core.settings import TrainSettings
    from arena_assets.gpu.data import PairDataset
    from arena_assets.gpu.train import _make_trainer_cls, _training_args, make_collator

    pad_id = 0
    model = build_model(shape, pad_id, args.fast_attn)
    n_lin = n_nonemb(model)
    torch.manual_seed(1234)
    model = get_peft_model(
        model, LoraConfig(task_type=TaskType.SEQ_CLS, r=64, lora_alpha=128, lora_dropout=0.0, target_modules="all-linear")
    )
    trainable = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    res: dict[str, Any] = {"lora": {"r": 64, "alpha": 128, "target_modules": "all-linear", "trainable_params": trainable},
                           "n_nonemb": n_lin, "configs": {}}
    rec.put("train", res)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, a: Any, s: Any, c: Any, **kw: Any) -> None:
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, a: Any, s: Any, c: Any, **kw: Any) -> None:
            sync()
            self.times.append(time.perf_counter() - self.t0)

    rng = np.random.default_rng(0)
    kd = {"alpha": 0.5, "temperature": 2.0, "label_smoothing": 0.05, "mse_weight": 0.0, "cos_weight": 0.0}
    compiled = False
    for spec in args.train_configs:
        L, bs, gc_on = int(spec[0]), int(spec[1]), bool(int(spec[2]))
        attn = spec[3] if len(spec) > 3 else args.fast_attn
        flags = spec[4] if len(spec) > 4 else ""
        pack, comp = "p" in flags, "c" in flags  # p: packed slabs (gpu/packing.py); c: compiled layers
        L = min(L, args.max_length) if args.tiny else L
        name = f"L{L}_bs{bs}_gc{int(gc_on)}_{attn}" + ("_packed" if pack else "") + ("_compiled" if comp else "")
        steps = args.train_steps
        try:
            if attn == "arena_flex":
                from arena_assets.gpu.packing import register_attention

                register_attention()
            set_attn(model, attn)
            if comp and not compiled:
                from arena_assets.gpu.fast import compile_layers

                compile_layers(model, dynamic=False)
                compiled = True
            elif compiled and not comp:
                from arena_assets.gpu.fast import uncompile_layers

                uncompile_layers(model)
                compiled = False
            if not gc_on and getattr(model, "is_gradient_checkpointing", False):
                model.gradient_checkpointing_disable()
            n = bs * steps
            ids = rng.integers(10, shape["vocab_size"], size=(n, L)).tolist()
            labels = np.eye(3)[rng.integers(0, 3, size=n)]
            teacher = np.log(rng.dirichlet([1, 1, 1], size=(n, 2))).astype(np.float32)
            ds = PairDataset(ids, labels, teacher)
            cfg = TrainSettings(
                learning_rate=5e-5, warmup_steps=0, per_device_batch_size=bs, grad_accum=1, max_steps=steps,
                max_length=L, bf16=True, gradient_checkpointing=gc_on, logging_steps=10_000, group_by_length=False,
                packing=pack, packing_slab_tokens=-(-bs * L // 128) * 128 if pack else None,
            )
            targs = _training_args(cfg, str(Path(args.out) / "trainer_scratch"), save=False, has_eval=False)
            if gc_on:
                targs.gradient_checkpointing_kwargs = {"use_reentrant": False}
            timer = StepTimer()
            trainer = _make_trainer_cls()(
                model=model, args=targs, train_dataset=ds, data_collator=make_collator(cfg, pad_id), kd=kd, callbacks=[timer]
            )
            free()
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
            timed_steps = timer.times[args.train_warmup :]
            st = float(np.median(timed_steps)) if timed_steps else float("nan")
            fl_step = 3 * float(flops_per_row(np.full(bs, L), n_lin, shape).sum())
            # FLOPs a frozen-base LoRA step needs (issue 19): forward 2NL + input-gradient backward
            # 2NL (no weight gradients of the frozen base) + attention forward and its backward
            # (dQ, dK, dV: twice the forward) + the adapters' own 6 N_lora L
            attn_fwd = float((flops_per_row(np.full(bs, L), 0, shape)).sum())
            fl_hw = 4.0 * n_lin * bs * L + 3 * attn_fwd + 6.0 * trainable * bs * L
            v = {
                "seq_len": L, "micro_batch": bs, "gradient_checkpointing": gc_on, "attn": attn, "packed": pack, "compiled": comp,
                "step_times_s": timer.times, "median_step_s": st, "tokens_per_s": bs * L / st,
                "tflops": fl_step / st / 1e12, "frac_of_ceiling": fl_step / st / 1e12 / ceiling if ceiling else None,
                "tflops_hw": fl_hw / st / 1e12, "frac_of_ceiling_hw": fl_hw / st / 1e12 / ceiling if ceiling else None,
                "peak_gib": peak_gib(), "wall_s": wall,
            }
            log.info("train %s: %.0f tok/s, frac %.3f, peak %.1f GiB", name, v["tokens_per_s"], v["frac_of_ceiling"] or 0, v["peak_gib"] or 0)
            res["configs"][name] = v
            del trainer
        except Exception as e:  # noqa: BLE001 - an OOM config is a result too
            res["configs"][name] = {"error": f"{type(e).__name__}: {str(e)[:400]}", "trace": traceback.format_exc()[-1500:]}
            log.error("train %s failed: %s", name, e)
            if hasattr(model, "zero_grad"):
                model.zero_grad(set_to_none=True)
        free()
        rec.put("train", res)
    del model
    free()


# ----------------------------------------------------------------------------- fixed-shape forward
def forward_rate(model: Any, bs: int, L: int, iters: int, vocab: int) -> dict[str, Any]:
    """bs rows of L tokens: one padded-free batch, or (flex models) one packed slab of bs*L tokens."""
    import torch

    from arena_assets.gpu.packing import pack, packed_logits, uses_flex

    dev = next(p.device for p in model.parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(10, vocab, (bs, L), generator=g).to(dev)
    m = torch.ones_like(x)
    if uses_flex(model):
        slab = pack(x.cpu().tolist(), 0).to(dev)

        def fwd() -> Any:
            return packed_logits(model, slab).float()
    else:

        def fwd() -> Any:
            return model(input_ids=x, attention_mask=m).logits.float()

    with torch.inference_mode():
        out = fwd()
        sync()
        free()
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fwd()
        sync()
        t = (time.perf_counter() - t0) / iters
    probs = torch.softmax(out, -1).cpu().numpy()
    return {"batch": bs, "seq_len": L, "packed": uses_flex(model), "s_per_batch": t, "tokens_per_s": bs * L / t, "peak_gib": peak_gib(),
            "probs": probs.round(5).tolist()}


def _record_failure(res: dict[str, Any], phase: str, e: BaseException) -> None:
    """A failed phase is a result too: its error and traceback go into the results file."""
    res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    res["trace"] = traceback.format_exc()[-2000:]
    log.error("%s failed: %s", phase, e)


def _bnb_int8(model: Any) -> dict[str, Any]:
    """Every decoder linear -> bitsandbytes ``Linear8bitLt`` (LLM.int8), in place; the head stays."""
    import bitsandbytes as bnb
    import torch

    todo = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "score"]
    for name, lin in todo:
        parent_name, _, child = name.rpartition(".")
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=6.0)
        q.weight = bnb.nn.Int8Params(lin.weight.data.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
        setattr(model.get_submodule(parent_name), child, q.to("cuda" if cuda() else "cpu"))
    n = len(todo)
    todo.clear()  # the list held the replaced bf16 layers alive (call 5 measured them in the peak)
    return {"backend": "bitsandbytes LLM.int8 (Linear8bitLt, threshold 6.0, has_fp16_weights=False)", "replaced": n}


def _gptq8(model: Any) -> dict[str, Any]:
    """GPTQ 8-bit through GPTQModel's own QuantLinear (benchmarks/gpu/gptq_random.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    from gptq_random import gptq_linearize

    return gptq_linearize(model, bits=8, group_size=128)


def compare_8bit(rec: Recorder, key: str, convert: Any, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    """bf16 vs the same model after ``convert`` (an 8-bit linear swap) at batch q_batch x q_len,
    same forward (``--q-attn arena_flex``: one packed slab): throughput, weights and peak memory,
    and the probability difference (random init)."""
    import torch

    res: dict[str, Any] = {"shape": f"batch {args.q_batch} x {args.q_len}", "attn": args.q_attn}
    rec.put(key, res)
    model = build_model(shape, 0, _attn(args.q_attn))
    fl = float(flops_per_row(np.full(args.q_batch, args.q_len), n_nonemb(model), shape).sum())
    try:
        res["bf16"] = forward_rate(model, args.q_batch, args.q_len, args.q_iters, shape["vocab_size"])
        res["bf16"]["frac_of_ceiling"] = fl / res["bf16"]["s_per_batch"] / 1e12 / ceiling if ceiling else None
        rec.put(key, res)
        t0 = time.perf_counter()
        res["method"] = convert(model)
        res["convert_seconds"] = time.perf_counter() - t0
        free()
        res[f"{key}_weights_gib"] = torch.cuda.memory_allocated() / 2**30 if cuda() else None
        res[key] = forward_rate(model, args.q_batch, args.q_len, args.q_iters, shape["vocab_size"])
        res[f"{key}_over_bf16_speed"] = res[key]["tokens_per_s"] / res["bf16"]["tokens_per_s"]
        pb, pq = np.asarray(res["bf16"]["probs"]), np.asarray(res[key]["probs"])
        res["max_abs_prob_diff_vs_bf16_random_init"] = float(np.abs(pb - pq).max())
    except Exception as e:  # noqa: BLE001 - recorded; the next phase still runs
        _record_failure(res, key, e)
    rec.put(key, res)
    del model
    free()


def phase_int8(rec: Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    compare_8bit(rec, "int8", _bnb_int8, args, shape, ceiling)


def phase_gptq(rec: Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    compare_8bit(rec, "gptq", _gptq8, args, shape, ceiling)


def phase_fp8(rec: Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    """bf16 vs fast.fp8_linearize (row and tensor scales) at batch 8 x 2000 (fixed) and on the TTA
    rows (real lengths, token-budget pass); then the fastest granularity with compiled layers."""
    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu.fast import compile_layers, fp8_linearize, tta_logits_fast
    from arena_assets.gpu.packing import uses_flex
    from arena_assets.gpu.predict import tta_logits

    res: dict[str, Any] = {"method": "arena_assets.gpu.fast.fp8_linearize: torch._scaled_mm, e4m3 weights and activations (dynamic scales), bf16 out; the 3-class head stays bf16"}
    rec.put("fp8", res)
    df, tok = synthetic_table(args.rows, seed=1)  # the TTA phase's rows: its compiled bf16 rate compares
    b = args.token_budgets[0]
    kw = {"max_tokens": b, "max_rows": args.max_rows, "pad_multiple": args.pad_multiple}
    attn = _attn(args.q_attn)
    res["attn"] = attn
    inf = InferSettings(max_length=args.max_length, batch_size=16, tta=True, slab_tokens=args.slabs[0])

    class Fmt:
        prompt_max_tokens = 256

    def real(model: Any) -> tuple[np.ndarray, float]:
        # the project's TTA entry point: packed slabs for flex models, token-budget batches otherwise
        if uses_flex(model):
            tta_logits(model, tok, df.head(64), Fmt, inf)
            return timed(lambda: tta_logits(model, tok, df, Fmt, inf))
        tta_logits_fast(model, tok, df.head(64), args.max_length, 256, **kw)
        return timed(lambda: tta_logits_fast(model, tok, df, args.max_length, 256, **kw))

    if args.fp8_compiled_only:
        # the production comparison: both models with compiled layers, on the TTA rows
        try:
            model = build_model(shape, tok.pad_token_id, attn)
            compile_layers(model, dynamic=not uses_flex(model))
            zb, tb = real(model)
            res["bf16_compiled_real"] = {"rows": len(df), "seconds": tb, "rows_per_s": len(df) / tb, "peak_gib": peak_gib()}
            rec.put("fp8", res)
            for gran in args.fp8_granularity:
                del model
                free()
                model = build_model(shape, tok.pad_token_id, attn)
                fp8_linearize(model, granularity=gran, scope=args.fp8_scope)
                free()
                compile_layers(model, dynamic=not uses_flex(model))
                zc, tc = real(model)
                res[f"compiled_{gran}" + ("" if args.fp8_scope == "all" else f"_{args.fp8_scope}")] = {
                    "rows": len(df), "seconds": tc, "rows_per_s": len(df) / tc, "over_bf16_compiled_speed": tb / tc,
                    "max_abs_prob_diff_vs_bf16_real_random_init": float(np.abs(softmax(zb) - softmax(zc)).max()),
                    "peak_gib": peak_gib(),
                }
                rec.put("fp8", res)
            del model
        except Exception as e:  # noqa: BLE001
            _record_failure(res, "fp8", e)
        rec.put("fp8", res)
        free()
        return
    try:
        model = build_model(shape, tok.pad_token_id, attn)
        res["bf16_fixed"] = forward_rate(model, args.q_batch, args.q_len, args.q_iters, shape["vocab_size"])
        zb, tb = real(model)
        res["bf16_real"] = {"rows": len(df), "seconds": tb, "rows_per_s": len(df) / tb}
        rec.put("fp8", res)
        best = None
        for i, gran in enumerate(args.fp8_granularity):
            if i:
                del model
                free()
                model = build_model(shape, tok.pad_token_id, attn)
            fp8_linearize(model, granularity=gran)
            free()
            r: dict[str, Any] = {"weights_gib": peak_gib()}
            r["fixed"] = forward_rate(model, args.q_batch, args.q_len, args.q_iters, shape["vocab_size"])
            zf, tf_ = real(model)
            r["real"] = {"rows": len(df), "seconds": tf_, "rows_per_s": len(df) / tf_}
            r["over_bf16_speed_fixed"] = r["fixed"]["tokens_per_s"] / res["bf16_fixed"]["tokens_per_s"]
            r["over_bf16_speed_real"] = tb / tf_
            r["max_abs_prob_diff_vs_bf16_real"] = float(np.abs(softmax(zb) - softmax(zf)).max())
            r["max_abs_prob_diff_vs_bf16_fixed"] = float(
                np.abs(np.asarray(res["bf16_fixed"]["probs"]) - np.asarray(r["fixed"]["probs"])).max())
            res[gran] = r
            rec.put("fp8", res)
            if best is None or tf_ < best[1]:
                best = (gran, tf_)
        if args.fp8_compile and best is not None:
            gran = best[0]
            if gran != args.fp8_granularity[-1]:
                del model
                free()
                model = build_model(shape, tok.pad_token_id, attn)
                fp8_linearize(model, granularity=gran)
            compile_layers(model, dynamic=not uses_flex(model))
            zc, tc = real(model)
            res["compiled"] = {"granularity": gran, "rows": len(df), "seconds": tc, "rows_per_s": len(df) / tc,
                               "max_abs_prob_diff_vs_bf16_real": float(np.abs(softmax(zb) - softmax(zc)).max()),
                               "peak_gib": peak_gib()}
        del model
    except Exception as e:  # noqa: BLE001
        _record_failure(res, "fp8", e)
    rec.put("fp8", res)
    free()


def phase_fp8fid(rec: Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    """FP8 fidelity on a TRAINED model: the fidelity benchmark's merged tiny student (``--fid-dir``
    holds its ``model/`` and the ``table.parquet`` of test rows), bf16 vs ``fp8_linearize``
    probabilities (issue 9: within 0.02), per granularity and scope (``all``: keys ``row``,
    ``tensor``; ``mlp``: ``row_mlp``...), and bf16 vs float32 for scale. Runs on CPU too, where
    ``torch._scaled_mm`` emulates FP8 (numbers close to, not equal to, the GPU's)."""
    import torch

    from arena_assets.core.settings import FormatSettings, InferSettings
    from arena_assets.gpu.fast import fp8_linearize
    from arena_assets.gpu.models import load_classifier
    from arena_assets.gpu.predict import predict_logits

    res: dict[str, Any] = {"model": "fidelity benchmark's merged student (benchmarks/bench_fidelity.py, known-answer sample)",
                           "device": "cuda" if cuda() else "cpu"}
    try:
        import pandas as pd

        fid = Path(args.fid_dir)
        df = pd.read_parquet(fid / "table.parquet")
        fmt, inf = FormatSettings(), InferSettings()
        res["rows"] = len(df)

        def probs(dtype: Any, gran: str | None = None, scope: str = "all") -> np.ndarray:
            model, tok = load_classifier(fid / "model")
            model = model.to("cuda" if cuda() else "cpu", dtype).eval()
            if gran is not None:
                fp8_linearize(model, granularity=gran, scope=scope)
            res.setdefault("config", {k: getattr(model.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "head_dim")})
            return softmax(predict_logits(model, tok, df, inf.max_length, fmt.prompt_max_tokens, batch_size=64))

        pb = probs(torch.bfloat16)
        res["bf16_max_abs_prob_diff_vs_fp32"] = float(np.abs(pb - probs(torch.float32)).max())
        for scope in args.fp8_scopes:
            for gran in args.fp8_granularity:
                pf = probs(torch.bfloat16, gran, scope)
                res[gran if scope == "all" else f"{gran}_{scope}"] = {
                    "max_abs_prob_diff_vs_bf16": float(np.abs(pf - pb).max()),
                    "mean_abs_prob_diff_vs_bf16": float(np.abs(pf - pb).mean())}
                rec.put("fp8fid", res)
    except Exception as e:  # noqa: BLE001
        _record_failure(res, "fp8fid", e)
    rec.put("fp8fid", res)
    free()


def phase_gemm8(rec: Recorder, args: argparse.Namespace, shape: dict[str, Any], ceiling: float) -> None:
    """GEMM level: bf16 mm vs torch._scaled_mm (FP8 e4m3, tensor and row scales) on the student's MLP
    shapes at 16k tokens, without the activation quantization: what FP8 can give at best here."""
    import torch

    res: dict[str, Any] = {}
    if not cuda():
        rec.put("gemm8", {"skipped": "no CUDA"})
        return
    M = 16384
    for name, (K, N) in {"gate_up": (shape["hidden_size"], shape["intermediate_size"]),
                         "down": (shape["intermediate_size"], shape["hidden_size"])}.items():
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        sa, sw = torch.ones(M, 1, device="cuda"), torch.ones(1, N, device="cuda")
        fns = {
            "bf16": lambda: a @ w.t(),
            "fp8_tensor": lambda: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
            "fp8_row": lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16),
        }
        r = {}
        for k, fn in fns.items():
            try:
                for _ in range(3):
                    fn()
                sync()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(20):
                    fn()
                e1.record()
                e1.synchronize()
                t = e0.elapsed_time(e1) / 1e3 / 20
                r[k] = {"s": t, "tflops": 2 * M * K * N / t / 1e12}
            except Exception as e:  # noqa: BLE001
                r[k] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        res[f"{name}_M{M}_K{K}_N{N}"] = r
        del a, w, a8, w8
    rec.put("gemm8", res)
    free()


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench_gpu"))
    ap.add_argument("--phases", default="ceiling,tta,train")
    ap.add_argument("--tiny", action="store_true", help="tiny Gemma-2 on CPU: a dry run of the code paths")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=2000)
    ap.add_argument("--fast-attn", default="flex_attention")
    ap.add_argument("--tta-variants", type=lambda s: s.split(","), default=["naive", "project_eager", "fast", "compiled"])
    ap.add_argument("--fp8-compile", type=int, default=1)
    ap.add_argument("--fp8-granularity", type=lambda s: s.split(","), default=["row", "tensor"])
    ap.add_argument("--max-rows", type=int, default=512)
    ap.add_argument("--pad-multiple", type=int, default=16)
    ap.add_argument("--token-budgets", type=lambda s: [int(x) for x in s.split(",")], default=[32768])
    ap.add_argument("--train-configs", default="1024:8:1,2000:8:1,2000:2:0",
                    help="L:micro_batch:grad_ckpt[:attn],... ")
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument("--q-batch", type=int, default=8)
    ap.add_argument("--q-len", type=int, default=2000)
    ap.add_argument("--q-iters", type=int, default=4)
    ap.add_argument("--fp8-compiled-only", type=int, default=0, help="fp8 phase: only bf16 vs FP8 with compiled layers")
    ap.add_argument("--fp8-scope", default="all", help="fp8 phase (--fp8-compiled-only): all or mlp")
    ap.add_argument("--fp8-scopes", type=lambda s: s.split(","), default=["all"], help="fp8fid: all and/or mlp")
    ap.add_argument("--fid-dir", default=str(ROOT / ".fid"), help="fp8fid phase: trained model/ + table.parquet")
    ap.add_argument("--q-attn", default="eager", help="attention for the int8/fp8 phases (arena_flex: packed)")
    ap.add_argument("--slabs", type=lambda s: [int(x) for x in s.split(",")], default=[16384],
                    help="packed slab sizes (tokens) for the packed TTA variants")
    ap.add_argument("--ceiling-n", type=int, default=8192)
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import bench_flex
    import bench_tta2

    bench_tta2.add_args(ap)
    bench_flex.add_args(ap)
    args = ap.parse_args(argv)
    args.train_configs = [c.split(":") for c in args.train_configs.split(",") if c]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    shape = TINY if args.tiny else GEMMA2_9B
    rec = Recorder(Path(args.out))
    rec.put("meta", {"versions": versions(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "argv": sys.argv, "shape": shape, "flops_formula": FLOPS_FORMULA, "tiny": args.tiny})
    t_start = time.perf_counter()
    ceiling = args.ceiling_value or None  # a warm-up child gets its parent's
    phases = args.phases.split(",")
    if "ceiling" in phases:
        c = matmul_ceiling(512 if args.tiny else args.ceiling_n)
        ceiling = c["tflops"]
        rec.put("ceiling", c)
        log.info("ceiling %.1f TFLOP/s", ceiling)
    table = {**bench_tta2.PHASES, **bench_flex.PHASES, "gemm8": phase_gemm8, "fp8fid": phase_fp8fid, "gptq": phase_gptq, "tta": phase_tta,
             "fp8": phase_fp8, "int8": phase_int8, "train": phase_train}
    for name in phases:  # in the order given: put a phase that may stall last
        fn = table.get(name)
        if fn is not None:
            t0 = time.perf_counter()
            fn(rec, args, shape, ceiling)
            rec.data.setdefault("phase_seconds", {})[name] = time.perf_counter() - t0
            rec.flush()
    if "ceiling" in phases:  # again at the end: the card's rate can drift with temperature
        c2 = matmul_ceiling(512 if args.tiny else args.ceiling_n)
        rec.put("ceiling_end", c2)
    rec.put("total_seconds", time.perf_counter() - t_start)
    summary(rec.data)
    return 0


def summary(d: dict[str, Any]) -> None:
    print("\n==== summary ====")
    if "ceiling" in d:
        print(f"ceiling {d['ceiling']['tflops']:.1f} TFLOP/s (end: {d.get('ceiling_end', {}).get('tflops', float('nan')):.1f})")
    for k, v in d.get("tta", {}).get("variants", {}).items():
        print(f"tta {k:28s} " + (f"{v['rows_per_s']:.2f} rows/s {v['tokens_per_s']:.0f} tok/s frac {v['frac_of_ceiling'] or 0:.3f} peak {v['peak_gib'] or 0:.1f}G" if "error" not in v else v["error"][:200]))
    for k, v in d.get("train", {}).get("configs", {}).items():
        print(f"train {k:26s} " + (f"{v['tokens_per_s']:.0f} tok/s frac {v['frac_of_ceiling'] or 0:.3f} peak {v['peak_gib'] or 0:.1f}G" if "error" not in v else v["error"][:200]))
    print("gemm8", json.dumps({k: {a: round(b.get("tflops", 0), 1) for a, b in v.items()} for k, v in d.get("gemm8", {}).items() if isinstance(v, dict)}))
    if "fp8fid" in d:
        print("fp8fid", {k: v for k, v in d["fp8fid"].items() if k != "trace"})
    if "gptq" in d:
        g = d["gptq"]
        print("gptq", {k: v for k, v in g.items() if k not in ("trace", "bf16", "gptq")},
              {k: {a: b for a, b in g[k].items() if a != "probs"} for k in ("bf16", "gptq") if k in g})
    for ph in ("int8", "fp8"):
        if ph == "fp8" and ph in d:
            for g in ("row", "tensor", "compiled", "compiled_row", "compiled_tensor", "bf16_compiled_real"):
                if g in d[ph]:
                    print("fp8", g, {k: v for k, v in d[ph][g].items() if not isinstance(v, dict)}, d[ph][g].get("real"))
        if ph in d:
            print(ph, {k: v for k, v in d[ph].items() if isinstance(v, (int, float, str)) and k != "trace"})
    print("phase_seconds", d.get("phase_seconds"), "total", d.get("total_seconds"))


if __name__ == "__main__":
    sys.exit(main())
