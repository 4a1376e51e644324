"""gpu/fast.py on CPU: the token-budget TTA pass gives the plain loop's logits; batching and
sharding cover every row once; FP8 linears stay close to bf16 (where torch._scaled_mm runs)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest

from arena_assets.gpu.fast import auto_pad_multiple, fp8_linearize, shard_rows, token_budget_batches, tta_logits_fast


def test_token_budget_batches_cover_rows_and_respect_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 2000, size=300)
    budget, pad = 8192, 128
    batches = token_budget_batches(lengths, max_tokens=budget, max_rows=64, pad_multiple=pad)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(300))  # each row exactly once
    longest = [int(lengths[b].max()) for b in batches]
    assert longest == sorted(longest, reverse=True)  # longest first
    for b in batches:
        padded = -(-int(lengths[b].max()) // pad) * pad
        assert len(b) <= 64
        assert len(b) == 1 or len(b) * padded <= budget


def test_shard_rows_partition() -> None:
    parts = [shard_rows(103, r, 4) for r in range(4)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    with pytest.raises(ValueError):
        shard_rows(10, 4, 4)


def _tiny(n_rows: int = 24) -> tuple:
    import pandas as pd

    from arena_assets.core.settings import TinyModelConfig
    from arena_assets.gpu.formatting import TINY_FORMAT, corpus_texts
    from arena_assets.gpu.models import build_tiny, train_word_tokenizer

    rng = np.random.default_rng(1)

    def text(k: int) -> str:
        return json.dumps([" ".join(f"w{j}" for j in rng.integers(0, 50, size=k))])

    df = pd.DataFrame(
        {
            "id": [str(i) for i in range(n_rows)],
            "prompt": [text(int(k)) for k in rng.integers(1, 20, n_rows)],
            "response_a": [text(int(k)) for k in rng.integers(1, 80, n_rows)],
            "response_b": [text(int(k)) for k in rng.integers(1, 80, n_rows)],
        }
    )
    tok = train_word_tokenizer(corpus_texts([df], TINY_FORMAT), vocab_size=400)
    tok.arena_format = TINY_FORMAT
    cfg = TinyModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, intermediate_size=64, max_position_embeddings=512)
    model = build_tiny(cfg, tok, attn_implementation="eager").eval()
    return df, tok, model


def test_tta_fast_matches_plain_loop() -> None:
    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu.predict import tta_logits

    class Fmt:
        prompt_max_tokens = 12

    df, tok, model = _tiny()
    assert auto_pad_multiple(model) == 16  # eager; flex_attention needs its 128 block
    infer = InferSettings(max_length=96, batch_size=5, tta=True, sort_by_length=False)
    ref = tta_logits(model, tok, df, Fmt, infer)  # CPU: the plain fixed-batch loop
    fast = tta_logits_fast(model, tok, df, 96, 12, max_tokens=512, max_rows=7, pad_multiple=16)
    assert fast.shape == (len(df), 3)
    np.testing.assert_allclose(fast, ref, atol=2e-4, rtol=1e-4)
    assert np.abs(ref).max() > 1e-3  # not a trivially zero model
    no_tta = tta_logits_fast(model, tok, df, 96, 12, tta=False, max_tokens=512)
    assert not np.allclose(no_tta, fast)  # TTA really averages in the swapped pass


def test_fp8_linearize_close_to_bf16() -> None:
    import torch

    df, tok, model = _tiny(8)
    model = model.to(torch.bfloat16)
    ids = torch.randint(7, len(tok), (4, 40))
    with torch.inference_mode():
        ref = torch.softmax(model(input_ids=ids).logits.float(), -1)
    n = fp8_linearize(model, granularity="row")
    assert n == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers; the score head stays
    assert type(model.score).__name__ == "Linear"
    try:
        with torch.inference_mode():
            got = torch.softmax(model(input_ids=ids).logits.float(), -1)
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch._scaled_mm not available on this device: {e}")
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() < 0.02


def test_shard_rows_balanced_by_length() -> None:
    rng = np.random.default_rng(2)
    lengths = rng.integers(10, 2000, size=257)
    parts = [shard_rows(257, r, 3, lengths) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(257))
    loads = [int(lengths[p].sum()) for p in parts]
    assert max(loads) - min(loads) <= int(lengths.max())  # within one row of each other
    strided = [int(lengths[shard_rows(257, r, 3)].sum()) for r in range(3)]
    assert max(loads) - min(loads) <= max(strided) - min(strided)


def test_fp8_mlp_scope_leaves_attention_bf16() -> None:
    import torch

    _, _, model = _tiny(4)
    model = model.to(torch.bfloat16)
    assert fp8_linearize(model, scope="mlp") == 2 * 3  # gate, up, down in each of 2 layers
    attn = model.model.layers[0].self_attn
    assert all(type(getattr(attn, p)).__name__ == "Linear" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Fp8Linear"
    with pytest.raises(ValueError):
        fp8_linearize(model, scope="attention")


def test_infer_fp8_setting_applies_only_where_it_can() -> None:
    import torch

    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu.predict import apply_fp8

    _, _, model = _tiny(4)
    assert apply_fp8(model, InferSettings()) == {"fp8": "off"}
    rec = apply_fp8(model, InferSettings(fp8="mlp"), force=True)  # float32 model: refused, said why
    assert rec["fp8"] == "off" and "bf16" in rec["fp8_skipped"]
    model = model.to(torch.bfloat16)
    if not torch.cuda.is_available():  # CPU: no FP8 tensor cores, so not applied unless forced
        assert apply_fp8(model, InferSettings(fp8="mlp"))["fp8"] == "off"
    rec = apply_fp8(model, InferSettings(fp8="mlp"), force=True)
    assert rec == {"fp8": "mlp", "fp8_linears": 6}
