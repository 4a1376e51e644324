"""Build benchmarks/results/gpu.json from the raw device outputs in benchmarks/gpu/raw/.

Every figure is copied from a raw file written by ``bench_gpu.py`` on the device in this session;
ratios are taken only between numbers of the SAME call (same card, same machine). Which call
each field comes from is written beside it (``source``).

Usage: python benchmarks/gpu/summarize.py  (no GPU needed)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RAW = HERE / "raw"
OUT = ROOT / "benchmarks" / "results" / "gpu.json"

TTA_CALL = "call7_h100.json"  # ceiling + naive + packed TTA (uncompiled, compiled) + packed training, one call (H100)
MAIN_CALL = "call8_h100.json"  # ceiling + FP8 fidelity + FP8 vs bf16 (compiled) + bnb int8 packed + compiled training (H100)
GEMM_CALL = "call5_h100.json"  # GEMM-level FP8 vs bf16 and the eager training baseline (H100, previous session)
OLD_TTA_CALL = "call4_h100.json"  # the previous session's best (token-budget batches, eager, compiled)
GPTQ_CALL = "call9_h200x2/gptq_raw.json"  # GPTQ 8-bit vs bf16 (H200, eager attention)
SCALING = "call9_h200x2"  # TTA 1 vs 2 GPUs (H200 x2)
SCALING_TRAIN = "call10_h200x2"  # DDP training 1 vs 2 GPUs (H200 x2)
CPU_FP8FID = "cpu_fp8fid.json"  # FP8 fidelity by granularity and scope, CPU emulation (no device time needed)
TEST_ROWS = 25_000


def load(name: str) -> dict[str, Any] | None:
    p = RAW / name
    return json.loads(p.read_text()) if p.exists() else None


def r(x: float | None, n: int = 3) -> float | None:
    return None if x is None else round(float(x), n)


def _variants(v: dict[str, Any]) -> dict[str, Any]:
    keys = ("rows_per_s", "tokens_per_s", "frac_of_ceiling", "peak_gib", "warmup_seconds")
    return {k: ({kk: r(x[kk], 3) for kk in keys} | {"attn": x["attn"]}) if "error" not in x else {"error": x["error"][:200]}
            for k, x in v.items()}


def _train_cfgs(cfgs: dict[str, Any]) -> dict[str, Any]:
    keys = ("tokens_per_s", "frac_of_ceiling", "peak_gib", "median_step_s")
    return {k: {kk: r(x[kk], 3) for kk in keys} if "error" not in x else {"error": x["error"][:160]} for k, x in cfgs.items()}


def main() -> int:
    tta_call, main_call = load(TTA_CALL), load(MAIN_CALL)
    if tta_call is None or main_call is None:
        print(f"missing {RAW / TTA_CALL} or {RAW / MAIN_CALL}", file=sys.stderr)
        return 1
    meta = tta_call["meta"]
    v = tta_call["tta"]["variants"]
    naive = v["naive_eager_order_b8"]
    best_name = max((k for k in v if "error" not in v[k]), key=lambda k: v[k]["rows_per_s"])
    best = v[best_name]
    ceiling = tta_call["ceiling"]["tflops"]
    out: dict[str, Any] = {
        "card": meta["versions"].get("gpu"),
        "versions": meta["versions"],
        "date_utc": meta["date_utc"],
        "ceiling_tflops_bf16": r(ceiling, 1),
        "ceiling_note": "torch bf16 8192^3 matmul, random inputs rotated over 3 sets, median of 30 (cuBLAS), measured "
        f"at the start of each call; end of the TTA call: {r(tta_call.get('ceiling_end', {}).get('tflops'), 1)}",
        "flops_formula": meta["flops_formula"],
        "model_shape": "Gemma-2-9B (vocab 256000, hidden 3584, intermediate 14336, 42 layers, 16 heads, 8 KV heads, "
        "head dim 256, softcaps 50/30, sliding window 4096) as a 3-class Gemma2ForSequenceClassification, "
        "random init, bf16, built on the GPU",
        "n_nonemb": tta_call["tta"]["n_nonemb"],
        # ------------------------------------------------------------------ TTA
        "tta_rows": tta_call["tta"]["rows"],
        "tta_length_source": tta_call["tta"]["length_source"],
        "tta_tokens_per_row_mean": r(tta_call["tta"]["tokens_per_row_mean"], 1),
        "tta_best_variant": best_name,
        "tta_path": "predict.tta_logits on CUDA with arena_flex: both orientations packed into 16384-token slabs "
        "(gpu/packing.py), block-diagonal BlockMask, softcap as flex score_mod, decoder layers compiled once "
        "(InferSettings.compile)",
        "tta_rows_per_s": r(best["rows_per_s"], 2),
        "tta_tokens_per_s": r(best["tokens_per_s"], 0),
        "tta_frac_of_ceiling": r(best["frac_of_ceiling"]),
        "tta_naive_rows_per_s": r(naive["rows_per_s"], 2),
        "tta_naive_frac_of_ceiling": r(naive["frac_of_ceiling"]),
        "tta_speedup_vs_naive": r(best["rows_per_s"] / naive["rows_per_s"], 2),
        "tta_softcapping_applied": True,
        "tta_max_abs_logit_diff_vs_naive": tta_call["tta"].get("max_abs_logit_diff_vs_naive_eager_order_b8"),
        "tta_variants": _variants(v),
        "tta_rows_per_s_note": "rows/s = test rows finished per second with TTA (each row run twice: as given and A/B-swapped)",
        "projected_hours_25k_tta": r(TEST_ROWS / best["rows_per_s"] / 3600, 2),
        "projected_hours_25k_tta_naive": r(TEST_ROWS / naive["rows_per_s"] / 3600, 2),
        "projected_note": f"{TEST_ROWS} rows x 2 orientations at the measured rows/s on one H100, real length "
        "distribution (mean ~712 tokens); compile warm-up (about 1-4 min once per process) not included",
        "source_tta": f"benchmarks/gpu/raw/{TTA_CALL}",
    }
    old = load(OLD_TTA_CALL)
    if old:
        ov = old["tta"]["variants"]
        ob = max((k for k in ov if "error" not in ov[k]), key=lambda k: ov[k]["rows_per_s"])
        out["tta_previous_best"] = {"variant": ob, "frac_of_ceiling": r(ov[ob]["frac_of_ceiling"]),
                                    "rows_per_s": r(ov[ob]["rows_per_s"], 2), "source": f"benchmarks/gpu/raw/{OLD_TTA_CALL}"}
    # ------------------------------------------------------------------ training
    cfgs = {**tta_call.get("train", {}).get("configs", {}), **main_call.get("train", {}).get("configs", {})}
    gemm = load(GEMM_CALL)
    ok = {k: x for k, x in cfgs.items() if "error" not in x and x["seq_len"] == 2000}
    best_t = max(ok, key=lambda k: ok[k]["frac_of_ceiling"], default=None)
    out.update({
        "train_frac_of_ceiling": r(ok[best_t]["frac_of_ceiling"]) if best_t else None,
        "train_best_config_2000": best_t,
        "train_path": "the project's ArenaTrainer (KD loss) with TrainSettings(packing=True, compile=True), arena_flex, "
        "bf16, LoRA r=64/alpha=128 all-linear, no gradient checkpointing; fixed-length rows of 2000 tokens, 2 per slab",
        "train_configs": _train_cfgs(cfgs),
        "train_configs_eager_previous": _train_cfgs(gemm.get("train", {}).get("configs", {})) if gemm else None,
        "train_lora": tta_call.get("train", {}).get("lora"),
        "train_ceilings_tflops_bf16": {TTA_CALL: r(ceiling, 1), MAIN_CALL: r(main_call["ceiling"]["tflops"], 1)},
        "source_train": f"benchmarks/gpu/raw/{MAIN_CALL} (compiled), benchmarks/gpu/raw/{TTA_CALL} (uncompiled)",
    })
    # ------------------------------------------------------------------ FP8
    fp8 = main_call.get("fp8", {})
    ref = fp8.get("bf16_compiled_real", {})
    fid = main_call.get("fp8fid", {})
    grans = [g for g in ("row", "tensor") if f"compiled_{g}" in fp8]
    if grans and ref:
        out["fp8_over_bf16_speed"] = r(fp8["compiled_row"]["over_bf16_compiled_speed"]) if "compiled_row" in fp8 else None
        out["fp8_granularity"] = "row (per-token activation and per-channel weight scales): the one closer to bf16"
        out["fp8_detail"] = {
            g: {"over_bf16_speed": r(fp8[f"compiled_{g}"]["over_bf16_compiled_speed"]),
                "rows_per_s": r(fp8[f"compiled_{g}"]["rows_per_s"], 2),
                "peak_gib": r(fp8[f"compiled_{g}"]["peak_gib"], 2),
                "max_abs_prob_diff_vs_bf16_trained_tiny": r(fid.get(g, {}).get("max_abs_prob_diff_vs_bf16"), 4),
                "mean_abs_prob_diff_vs_bf16_trained_tiny": r(fid.get(g, {}).get("mean_abs_prob_diff_vs_bf16"), 4),
                "max_abs_prob_diff_vs_bf16_random_init_9b": r(fp8[f"compiled_{g}"]["max_abs_prob_diff_vs_bf16_real_random_init"])}
            for g in grans
        }
        out["fp8_bf16_compiled_rows_per_s"] = r(ref["rows_per_s"], 2)
        out["fp8_bf16_compiled_peak_gib"] = r(ref.get("peak_gib"), 2)
        out["fp8_note"] = ("both sides: the packed TTA pass on the same 256 real-length rows with compiled decoder layers, "
                           "same call; fidelity on the fidelity benchmark's trained merged student (4000 test rows). "
                           "scope='mlp' (attention projections bf16): see fp8_fidelity_cpu_emulation; its GPU speed "
                           "was not measured")
    cpu = (load(CPU_FP8FID) or {}).get("fp8fid", {})
    if cpu:
        out["fp8_fidelity_cpu_emulation"] = {
            "max_abs_prob_diff_vs_bf16": {k: r(v["max_abs_prob_diff_vs_bf16"], 4) for k, v in cpu.items()
                                          if isinstance(v, dict) and "max_abs_prob_diff_vs_bf16" in v},
            "bf16_max_abs_prob_diff_vs_fp32": r(cpu.get("bf16_max_abs_prob_diff_vs_fp32"), 4),
            "note": "same model and rows on this project's CPU machine, torch._scaled_mm's CPU emulation of FP8; "
                    "keys: granularity (all linears) or granularity_mlp (MLP linears only)",
            "source": f"benchmarks/gpu/raw/{CPU_FP8FID}",
        }
    out["source_fp8"] = f"benchmarks/gpu/raw/{MAIN_CALL}"
    out["gemm_fp8_vs_bf16"] = gemm.get("gemm8") if gemm else None
    # ------------------------------------------------------------------ 8-bit
    i8 = main_call.get("int8", {})
    if "int8" in i8:
        out.update({
            "bnb_int8_over_bf16_speed": r(i8["int8_over_bf16_speed"]),
            "peak_gib_bnb_int8_infer": r(i8["int8"]["peak_gib"], 2),
            "peak_gib_bf16_infer_8x2000": r(i8["bf16"]["peak_gib"], 2),
            "bnb_int8_weights_gib": r(i8.get("int8_weights_gib"), 2),
            "bnb_int8_max_abs_prob_diff_vs_bf16_random_init": r(i8.get("max_abs_prob_diff_vs_bf16_random_init",
                                                                        i8.get("max_abs_prob_diff_vs_bf16"))),
            "bnb_int8_attention": "arena_flex, batch 8 x 2000 as one packed slab",
        })
    gq = load(GPTQ_CALL)
    g = (gq or {}).get("gptq", {})
    if "gptq" in g:
        out.update({
            "gptq_over_bf16_speed": r(g["gptq_over_bf16_speed"]),
            "gptq_card": gq["meta"]["versions"].get("gpu"),
            "gptq_kernel": g["method"],
            "gptq_peak_gib_eager_8x2000": r(g["gptq"]["peak_gib"], 2),
            "gptq_bf16_peak_gib_eager_8x2000": r(g["bf16"]["peak_gib"], 2),
            "gptq_weights_gib": r(g.get("gptq_weights_gib"), 2),
            "gptq_max_abs_prob_diff_vs_bf16_random_init": r(g.get("max_abs_prob_diff_vs_bf16_random_init")),
            "gptq_note": "GPTQModel 7.6 TritonV2 QuantLinear (8-bit, group 128; random weights RTN-packed by GPTQModel's "
            "packer, benchmarks/gpu/gptq_random.py) vs bf16, same call, eager attention (the packed flex run stalled "
            "in its bf16 reference's flex compile, raw/call8b_h100_stalled.json). Its eager peak holds the 8x16x2000^2 "
            "attention scores; with the packed slab the bnb run's activations were 2.6 GiB, so GPTQ packed is expected "
            "near 9.7 + 2.6 + 0.1 = 12.4 GiB (not measured)",
            "source_gptq": f"benchmarks/gpu/raw/{GPTQ_CALL}",
        })
    out["peak_gib_8bit_infer"] = out.get("peak_gib_bnb_int8_infer")
    out["peak_gib_8bit_infer_method"] = ("measured with bitsandbytes int8 (9.6 GiB weights) at batch 8 x 2000 packed "
                                         "with arena_flex on the H100; GPTQ's measured peak is eager-attention only "
                                         "(gptq_peak_gib_eager_8x2000)")
    # ------------------------------------------------------------------ scaling
    t1, t2 = load(f"{SCALING}/scaling_tta_1.json"), load(f"{SCALING}/scaling_tta_2.json")
    if t1 and t2:
        out["tta_scaling_2gpu"] = r(t2["rows_per_s"] / (2 * t1["rows_per_s"]))
        out["tta_scaling_detail"] = {
            "card": (t1.get("versions") or {}).get("gpu"), "rows": t1["rows"], "attn": t1["attn"],
            "rows_per_s_1gpu": r(t1["rows_per_s"], 2), "rows_per_s_2gpu": r(t2["rows_per_s"], 2),
            "rank_seconds_2gpu": [r(t2["seconds_this_rank"], 2), r(t2["seconds_slowest"], 2)],
            "shard": "strided (fast.shard_rows without lengths); the ranks finished 5 % apart",
            "note": "the 1-GPU baseline ran on GPU 0 while the GPTQ measurement ran on GPU 1 of the same host",
        }
    s1, s2 = load(f"{SCALING_TRAIN}/scaling_train_1.json"), load(f"{SCALING_TRAIN}/scaling_train_2.json")
    if s1 and s2:
        out["train_scaling_2gpu"] = r(s2["tokens_per_s"] / (2 * s1["tokens_per_s"]))
        a1, a2 = load(f"{SCALING_TRAIN}/scaling_train_1_accum1.json"), load(f"{SCALING_TRAIN}/scaling_train_2_accum1.json")
        out["train_scaling_detail"] = {
            "card": (s1.get("versions") or {}).get("gpu"),
            "config": f"L{s1['seq_len']} micro-batch {s1['micro_batch_per_gpu']} per GPU, grad_accum {s1.get('grad_accum')}, "
            f"{s1['attn']} attention, LoRA r=64 all-linear, Trainer DDP under torchrun",
            "tokens_per_s_1gpu": r(s1["tokens_per_s"], 0), "tokens_per_s_2gpu": r(s2["tokens_per_s"], 0),
            "scaling_grad_accum_1": r(a2["tokens_per_s"] / (2 * a1["tokens_per_s"])) if a1 and a2 else None,
            "note": "DDP all-reduces the 216M LoRA gradients once per optimizer step: with grad_accum 1 (a sync every "
            "micro-batch) scaling was 0.77, with the recipe-like accumulation 8 it is the figure above",
        }
    out["scaling_cards_note"] = "2-GPU figures ran on an nvidia-h200-x2 machine (the kind the device tool lent); both sides of each ratio on that machine"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if OUT.exists():  # keep what later passes added by hand (h200_second_pass ... and their top-level fields)
        out = {**json.loads(OUT.read_text()), **out}
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(OUT)
    print(json.dumps({k: out.get(k) for k in ("tta_frac_of_ceiling", "tta_speedup_vs_naive", "train_frac_of_ceiling",
                                               "gptq_over_bf16_speed", "peak_gib_8bit_infer", "fp8_over_bf16_speed",
                                               "train_scaling_2gpu", "tta_scaling_2gpu", "projected_hours_25k_tta")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
