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
