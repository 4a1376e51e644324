"""A checkpoint loaded BY PATH (the real-model route: pointer dir, LoRA post-pretraining + merge),
and the GPU-only paths (bf16, bitsandbytes 4-bit QLoRA base), which skip cleanly without CUDA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.gpu.conftest import FIT, FMT, TEACHER, TINY

from arena_assets.core.settings import LoraSettings, ModelSpec, PostPretrainSettings
from arena_assets.gpu.models import BASE_POINTER, load_classifier
from arena_assets.gpu.pretrain import post_pretrain
from arena_assets.gpu.train import train_teacher

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def checkpoint(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'real' checkpoint on disk: a tiny llama saved with save_pretrained (no span tags)."""
    spec = ModelSpec(tiny=TINY.model_copy(update={"arch": "llama"}), span_tags=False)
    r = post_pretrain(spec, PostPretrainSettings(enabled=False), FMT, None, [data["train"]],
                      out_dir=tmp_path_factory.mktemp("ckpt") / "v1")
    return r.path("model")


def test_disabled_post_pretrain_passes_a_real_base_through(checkpoint: Path, data: dict[str, Any], tmp_path: Path) -> None:
    r = post_pretrain(ModelSpec(path=str(checkpoint)), PostPretrainSettings(enabled=False), FMT, data["external"], [],
                      out_dir=tmp_path / "pp")
    d = r.path("model")
    assert json.loads((d / BASE_POINTER).read_text())["path"] == str(checkpoint.resolve())
    assert not list(d.glob("*.safetensors"))  # the weights are referenced, never copied
    model, _ = load_classifier(d)
    assert model.arena_record["path"] == str(checkpoint.resolve()) and model.arena_record["pointer"] == str(d)
    assert r.info["post_pretrained"] is False


def test_real_base_lora_post_pretrain_merges_into_a_new_base(checkpoint: Path, data: dict[str, Any], tmp_path: Path) -> None:
    cfg = PostPretrainSettings(train=FIT.model_copy(update={"max_steps": 6}), lora=LoraSettings(r=4, alpha=8), max_rows=200)
    r = post_pretrain(ModelSpec(path=str(checkpoint)), cfg, FMT, data["external"], [], out_dir=tmp_path / "pp")
    d = r.path("model")
    assert not (d / "adapter_config.json").exists() and list(d.glob("*.safetensors"))  # merged, full model
    merged, _ = load_classifier(d)
    orig, tok = load_classifier(checkpoint)
    x = torch.tensor([[tok.bos_token_id, 9, 10, 11, tok.eos_token_id]])
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=x).logits, orig(input_ids=x).logits)
    assert r.info["model"]["lora"]["r"] == 4


@cuda
def test_bf16_teacher_on_gpu(base: Any, data: dict[str, Any], tmp_path: Path) -> None:
    cfg = TEACHER.model_copy(update={"train": TEACHER.train.model_copy(update={"bf16": True, "max_steps": 4})})
    r = train_teacher(base.path("model"), cfg, FMT, data["train0"], data["valid0"], None, out_dir=tmp_path / "t")
    assert r.metrics["valid_logloss"] > 0


@cuda
def test_qlora_4bit_base_on_gpu(checkpoint: Path, data: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    spec = ModelSpec(path=str(checkpoint), quantize_base="4bit", dtype="bfloat16")
    pp = post_pretrain(spec, PostPretrainSettings(enabled=False), FMT, None, [], out_dir=tmp_path / "pp")
    r = train_teacher(pp.path("model"), TEACHER.model_copy(update={"train": FIT.model_copy(update={"max_steps": 4})}),
                      FMT, data["train0"], data["valid0"], None, out_dir=tmp_path / "t")
    assert r.info["model"]["lora"]["qlora"] is True
    assert r.info["model"]["base"]["quantize_base"] == "4bit"
