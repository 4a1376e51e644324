"""gpu/packing.py on CPU: packed slabs give the padded forward's logits (eager and arena_flex,
Gemma-2 with rows longer than its sliding window, Llama, peft), the packed Trainer loss and
gradients equal the padded ones, and bin packing covers every row within capacity."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from arena_assets.gpu import packing as P

ROOT = Path(__file__).resolve().parents[2]


def _model(arch: str = "gemma2", attn: str = "eager", sliding_window: int = 24):
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, pad_token_id=0, num_labels=3, max_position_embeddings=512)
    if arch == "gemma2":
        cfg = Gemma2Config(**common, sliding_window=sliding_window, attn_logit_softcapping=5.0)
        cls = Gemma2ForSequenceClassification
    else:
        cfg = LlamaConfig(**common)
        cls = LlamaForSequenceClassification
    if attn == P.ATTN_NAME:
        P.register_attention()
    cfg._attn_implementation = attn
    return cls(cfg).eval()


def _rows(n: int = 14, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 300, size=int(k)).tolist() for k in rng.integers(2, 60, size=n)]


def _one_by_one(model, rows):
    import torch

    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([r])).logits for r in rows]).numpy()


def test_pack_bins_cover_rows_within_capacity_and_fill_well() -> None:
    spec = json.loads((ROOT / "benchmarks/gpu/arena_lengths.json").read_text())
    lens = np.minimum(np.asarray(spec["lengths"]).sum(axis=1), 2000)  # prompt + A + B, capped like the recipe
    bins = P.pack_bins(lens, 16384)
    flat = np.concatenate(bins)
    assert sorted(flat.tolist()) == list(range(len(lens)))
    used = [int(lens[b].sum()) for b in bins]
    assert max(used) <= 16384
    assert sum(used) / (len(bins) * 16384) > 0.95  # best-fit decreasing: little left empty
    with pytest.raises(ValueError, match="does not fit"):
        P.pack_bins([10, 20000], 16384)


def test_pack_layout() -> None:
    p = P.pack([[5, 6, 7], [8, 9]], pad_id=0, total=8)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert p.doc_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert p.ends.tolist() == [2, 4]
    with pytest.raises(ValueError):
        P.pack([[1] * 9], pad_id=0, total=8)


@pytest.mark.parametrize("longest", [20, 40])
def test_masks_take_the_longest_row_from_the_host(longest: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a slab needs Gemma-2's sliding-window mask is decided from the row lengths known when
    packing, never by reading the positions back from the device (on a GPU that read made the host
    wait for the previous slab once per slab, docs/gpu.md). Positions' ``max`` is made to fail."""
    import torch

    model = _model("gemma2", "eager", sliding_window=24)
    rows = [[7] * longest, [8] * 5]
    p = P.pack(rows, pad_id=0, total=64).to("cpu")
    assert p.longest == longest

    def no_device_read(*a: object, **k: object) -> None:
        raise AssertionError("packed_masks read the positions back")

    monkeypatch.setattr(torch.Tensor, "max", no_device_read)
    masks = P.packed_masks(model, p)
    needs_window = longest > 24
    assert (masks["sliding_attention"] is not masks["full_attention"]) is needs_window


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("window", [None, 24, 100, 300])
@pytest.mark.parametrize("seed", [0, 1])
def test_doc_block_mask_equals_create_block_mask(block: int, window: int | None, seed: int) -> None:
    """The BlockMask built from the slab's tiles (no create_block_mask, whose compile took minutes
    on the H200) has exactly the partial/full block tensors, both orientations, that torch's
    create_block_mask derives from the dense mask: documents shorter and longer than a tile, rows
    crossing tile edges, a pad tail, with and without a sliding window."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    rng = np.random.default_rng(seed)
    rows = [[1] * int(k) for k in rng.integers(1, 3 * block, size=40)]
    total = -(-sum(map(len, rows)) // block) * block + block  # a pad tail of at least one tile
    doc = P.pack(rows, pad_id=0, total=total).doc_ids[0]

    def mod(b, h, q, kv):
        ok = (doc[q] == doc[kv]) & (q >= kv)
        return ok if window is None else ok & (q - kv < window)

    got = P.doc_block_mask(doc, mod, window, block=block)
    ref = create_block_mask(mod, B=None, H=None, Q_LEN=total, KV_LEN=total, device="cpu", BLOCK_SIZE=block)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert int(got.kv_num_blocks.sum()) > 0
    if window is None or window >= 2 * block:  # a full tile needs q - kv < window across it
        assert int(got.full_kv_num_blocks.sum()) > 0
    assert got.seq_lengths == (total, total) and got.mask_mod is mod


def test_packed_masks_never_call_create_block_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The slab's masks (full and sliding) come from the tiles: create_block_mask, whose compiled
    form cost 200+ s of cold start per process on the H200, is not called for a slab on the tile
    grid (the old code called it, compiled on CUDA, once per mask and slab)."""
    import torch.nn.attention.flex_attention as fa

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("create_block_mask called")

    monkeypatch.setattr(fa, "create_block_mask", refuse)
    model = _model("gemma2", P.ATTN_NAME, sliding_window=24)
    p = P.pack([[3] * 40, [4] * 30, [5] * 10], pad_id=0, total=128).to("cpu")
    masks = P.packed_masks(model, p)
    assert masks["sliding_attention"] is not masks["full_attention"]  # a row longer than the window
    assert all(isinstance(m, fa.BlockMask) for m in masks.values())


def test_doc_block_mask_falls_back_off_the_tile_grid() -> None:
    """A slab length that is not a multiple of the tile goes to create_block_mask (same mask)."""
    import torch

    doc = P.pack([[1] * 50, [1] * 30], pad_id=0, total=100).doc_ids[0]

    def mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    bm = P.doc_block_mask(doc, mod, block=64)
    dense = bm.to_dense()[0, 0]
    assert dense.shape == (2, 2) and torch.equal(dense, torch.tensor([[1, 0], [1, 1]], dtype=dense.dtype))


def test_flex_kernel_options_come_from_the_table_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per (capability, head dim) from FLEX_KERNEL_OPTIONS; $ARENA_FLEX_KERNEL_OPTIONS overrides it
    ("{}" = Inductor's default); never on CPU; resolved once per process and head dim."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(P, "_FLEX_OPTS", {})
    monkeypatch.setitem(P.FLEX_KERNEL_OPTIONS, ((9, 0), 256), {"fwd_BLOCK_M": 128})
    monkeypatch.delenv(P.KERNEL_OPTIONS_ENV, raising=False)
    assert P.flex_kernel_options(256, "cuda") == {"fwd_BLOCK_M": 128}
    assert P.flex_kernel_options(128, "cuda") is None  # not in the table: Inductor's default
    monkeypatch.setattr(P, "_FLEX_OPTS", {})
    monkeypatch.setenv(P.KERNEL_OPTIONS_ENV, "{}")
    assert P.flex_kernel_options(256, "cuda") is None
    monkeypatch.setattr(P, "_FLEX_OPTS", {})
    monkeypatch.setenv(P.KERNEL_OPTIONS_ENV, '{"fwd_num_warps": 8}')
    assert P.flex_kernel_options(256, "cuda") == {"fwd_num_warps": 8}
    monkeypatch.setattr(P, "_FLEX_OPTS", {})
    assert P.flex_kernel_options(256, "cpu") is None


def test_arena_flex_passes_the_resolved_kernel_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    seen: dict = {}

    def fake_flex(q, k, v, **kw):
        seen.update(kw)
        return q

    monkeypatch.setattr(P, "_flex", lambda device_type: fake_flex)
    monkeypatch.setattr(P, "_FLEX_OPTS", {16: {"fwd_BLOCK_M": 64}})
    doc = P.pack([[1] * 5, [1] * 3], pad_id=0, total=16).doc_ids[0]
    bm = P.doc_block_mask(doc, lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv), block=16)
    q, kv = torch.zeros(1, 4, 16, 16), torch.zeros(1, 2, 16, 16)
    out, _ = P.arena_flex_attention(None, q, kv, kv, bm, scaling=0.25, softcap=5.0)
    assert seen["kernel_options"] == {"fwd_BLOCK_M": 64} and seen["enable_gqa"] and seen["block_mask"] is bm
    assert out.shape == (1, 16, 4, 16)


@pytest.mark.parametrize("arch,attn", [("gemma2", "eager"), ("gemma2", P.ATTN_NAME), ("llama", "eager"), ("llama", P.ATTN_NAME)])
def test_packed_logits_equal_unpacked(arch: str, attn: str) -> None:
    model = _model(arch, attn)
    rows = _rows()
    assert max(len(r) for r in rows) > 24  # some rows cross Gemma-2's (tiny) sliding window
    ref = _one_by_one(_model(arch, "eager"), rows)
    z = P.logits_of_ids_packed(model, rows, pad_id=0, slab_tokens=256)  # several slabs
    assert np.abs(z - ref).max() < 1e-4


def test_packed_logits_through_peft() -> None:
    from peft import LoraConfig, TaskType, get_peft_model

    model = get_peft_model(_model(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in model.named_parameters():  # non-zero adapters, so LoRA is really in the path
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    rows = _rows(6)
    ref = _one_by_one(model, rows)
    z = P.logits_of_ids_packed(model, rows, pad_id=0, slab_tokens=512)
    assert np.abs(z - ref).max() < 1e-4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    "not __import__('torch').cuda.is_available()", reason="flex_attention has no backward on CPU"))])
def test_packed_trainer_loss_and_grads_equal_padded(device: str) -> None:
    import torch
    from transformers import TrainingArguments

    from arena_assets.gpu.data import PadCollator
    from arena_assets.gpu.train import _make_trainer_cls

    rows = _rows(6, seed=3)
    rng = np.random.default_rng(1)
    items = [{"input_ids": r, "labels": np.eye(3)[i % 3], "teacher_logits": np.log(rng.dirichlet([1, 1, 1], size=1))}
             for i, r in enumerate(rows)]
    kd = {"alpha": 0.5, "temperature": 2.0, "label_smoothing": 0.05, "mse_weight": 0.1, "cos_weight": 0.0}
    args = TrainingArguments(output_dir="/tmp/arena-test-packing", use_cpu=device == "cpu", report_to="none")
    # on CPU the packed slab runs eager attention with its block-diagonal mask (flex has no CPU
    # backward); on CUDA arena_flex
    packed_attn = P.ATTN_NAME if device == "cuda" else "eager"
    out = {}
    for name, collate, attn in (("padded", PadCollator(0), "eager"), ("packed", P.PackedCollator(0), packed_attn)):
        model = _model(attn=attn).train().to(device)
        trainer = _make_trainer_cls()(model=model, args=args, kd=kd)
        batch = {k: v.to(device) for k, v in collate(items).items()}
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[name] = (loss.item(), grads.cpu())
    assert abs(out["packed"][0] - out["padded"][0]) < 1e-5
    assert torch.allclose(out["packed"][1], out["padded"][1], atol=1e-5, rtol=1e-4)


def test_training_settings_pick_the_collator() -> None:
    from arena_assets.core.settings import TrainSettings
    from arena_assets.gpu.data import PadCollator
    from arena_assets.gpu.train import make_collator

    assert isinstance(make_collator(TrainSettings(), 0), PadCollator)
    c = make_collator(TrainSettings(packing=True, packing_slab_tokens=512, per_device_batch_size=2, max_length=256), 0)
    assert isinstance(c, P.PackedCollator)
    assert c([{"input_ids": [1, 2, 3]}])["input_ids"].shape == (1, 512)


# ------------------------------------------------------------------ streamed TTA (issue 19, fourth pass)
def _chunks(lengths, sizes):
    at = 0
    for k in sizes:
        idx = np.arange(at, at + k)
        yield idx, [[1] * int(lengths[i]) for i in idx]
        at += k


def test_stream_bins_cover_every_row_once_and_pack_as_tight_as_one_packing() -> None:
    rng = np.random.default_rng(4)
    lengths = rng.integers(20, 2000, size=600)
    sizes = [16, 32] + [64] * 8 + [40]
    assert sum(sizes) == len(lengths)
    bins = list(P.stream_bins(_chunks(lengths, sizes), 16384))
    seen = np.concatenate([b for b, _ in bins])
    assert sorted(seen.tolist()) == list(range(len(lengths)))  # every row once
    for b, ids in bins:
        assert [len(x) for x in ids] == lengths[b].tolist()  # ids travel with their index
        assert lengths[b].sum() <= 16384
    whole = P.pack_bins(lengths, 16384)
    assert len(bins) <= len(whole) + 1  # carrying the under-filled bins: about one packing's count
    naive = sum(len(P.pack_bins(lengths[i:i + k], 16384)) for i, k in zip(np.cumsum([0] + sizes[:-1]), sizes))
    assert len(bins) < naive  # without carrying, every chunk would leave its own part-filled slab
    with pytest.raises(ValueError, match="longest row"):
        list(P.stream_bins(_chunks(np.array([10, 300]), [1, 1]), 256))


def _tta_table(n_rows: int = 40):
    import pandas as pd

    from arena_assets.gpu.formatting import TINY_FORMAT, corpus_texts
    from arena_assets.gpu.models import train_word_tokenizer

    rng = np.random.default_rng(5)

    def text(k: int) -> str:
        return json.dumps([" ".join(f"w{j}" for j in rng.integers(0, 50, size=k))])

    df = pd.DataFrame({"id": [str(i) for i in range(n_rows)],
                       "prompt": [text(int(k)) for k in rng.integers(1, 12, n_rows)],
                       "response_a": [text(int(k)) for k in rng.integers(1, 40, n_rows)],
                       "response_b": [text(int(k)) for k in rng.integers(1, 40, n_rows)]})
    tok = train_word_tokenizer(corpus_texts([df], TINY_FORMAT), vocab_size=300)
    tok.arena_format = TINY_FORMAT
    return df, tok


def test_encoded_chunks_grow_and_keep_each_rows_orientations_together() -> None:
    from arena_assets.gpu.formatting import encoded_chunks

    df, tok = _tta_table(150)
    chunks = list(encoded_chunks(df, tok, 64, 8, True, chunk_rows=64))
    assert [len(i) // 2 for i, _ in chunks] == [16, 32, 64, 38]  # 16, doubling, capped at 64
    for idx, ids in chunks:
        half = len(idx) // 2
        assert (idx[half:] == idx[:half] + len(df)).all()  # a row and its swap in one chunk
        assert [len(x) for x in ids[:half]] == [len(x) for x in ids[half:]]
    (whole_idx, whole), = encoded_chunks(df, tok, 64, 8, True)  # one chunk: what tta_in_one_pass reads
    assert (whole_idx == np.arange(2 * len(df))).all()
    by_index = {int(i): x for idx, ids in chunks for i, x in zip(idx, ids)}
    assert [by_index[i] for i in range(2 * len(df))] == whole  # the same ids, only chunked
    (empty_idx, empty), = encoded_chunks(df.head(0), tok, 64, 8, True, chunk_rows=64)
    assert len(empty_idx) == 0 and empty == []


def test_streamed_tta_equals_encoding_everything_first() -> None:
    from arena_assets.gpu.formatting import tta_in_one_pass

    df, tok = _tta_table()
    model = _model("gemma2", P.ATTN_NAME)
    ref = tta_in_one_pass(df, tok, 64, 8, True, lambda ids: _one_by_one(model, ids).astype(np.float64))
    z = P.tta_logits_packed(model, tok, df, 64, 8, tta=True, slab_tokens=256, chunk_rows=8)
    assert np.abs(z - ref).max() < 1e-4
    plain = P.tta_logits_packed(model, tok, df, 64, 8, tta=False, slab_tokens=256, chunk_rows=8)
    ref_plain = tta_in_one_pass(df, tok, 64, 8, False, lambda ids: _one_by_one(model, ids).astype(np.float64))
    assert np.abs(plain - ref_plain).max() < 1e-4 and np.abs(plain - z).max() > 1e-4  # TTA really averages


def test_the_first_slab_runs_before_the_whole_table_is_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The semantics that hides the host's tokenization behind the GPU: slabs are launched while
    later chunks are still to be encoded (the old pass encoded all rows, then ran)."""
    from arena_assets.gpu import formatting as F

    df, tok = _tta_table(100)
    model = _model("gemma2", P.ATTN_NAME)
    encoded: list[int] = []
    real = F.encode_rows
    monkeypatch.setattr(F, "encode_rows", lambda part, *a, **k: (encoded.append(len(part)), real(part, *a, **k))[1])
    at_first_forward: list[int] = []
    model.register_forward_pre_hook(lambda *_: at_first_forward.append(sum(encoded)) if not at_first_forward else None)
    P.tta_logits_packed(model, tok, df, 64, 8, tta=True, slab_tokens=256)  # the default chunks
    assert sum(encoded) == 2 * len(df)  # each row once per orientation
    assert at_first_forward and at_first_forward[0] < sum(encoded)
