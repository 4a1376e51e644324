"""Models: tiny build/save/load, provenance, no silent downgrade, softcapping record, adapters."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from arena_assets.core.settings import ModelSpec, TinyModelConfig
from arena_assets.gpu.formatting import TINY_FORMAT, span_text
from arena_assets.gpu.models import (
    attention_choice,
    build_tiny,
    load_classifier,
    model_record,
    resolve_checkpoint,
    save_classifier,
    train_word_tokenizer,
)

CFG = TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, intermediate_size=64, max_position_embeddings=128)


def _tiny(tmp_path: Path, arch: str = "gemma2") -> Path:
    tok = train_word_tokenizer([span_text("hello world good bad", s, TINY_FORMAT) for s in "pab"], 64, 128)
    model = build_tiny(CFG.model_copy(update={"arch": arch}), tok)
    return save_classifier(model, tok, TINY_FORMAT, tmp_path / arch)


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_tiny_round_trip_same_logits(tmp_path: Path, arch: str) -> None:
    d = _tiny(tmp_path, arch)
    m1, tok = load_classifier(d)
    m2, _ = load_classifier(d)
    x = torch.tensor([[tok.bos_token_id, 7, 8, 9, tok.eos_token_id]])
    with torch.no_grad():
        a, b = m1(input_ids=x).logits, m2(input_ids=x).logits
    assert a.shape == (1, 3)
    torch.testing.assert_close(a, b)
    assert tok.arena_format == TINY_FORMAT
    rec = m1.arena_record
    assert rec["path"] == str(d.resolve()) and len(rec["config_hash"]) == 16
    if arch == "gemma2":
        assert rec["softcapping_applied"] is True  # eager by default


def test_model_record_reads_snapshot_commit(tmp_path: Path) -> None:
    snap = tmp_path / "models--x" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert model_record(snap)["commit"] == "abc123"


def test_missing_checkpoint_is_refused_not_downgraded(tmp_path: Path) -> None:
    small = _tiny(tmp_path)
    with pytest.raises(FileNotFoundError, match="refusing to substitute"):
        resolve_checkpoint(ModelSpec(path=str(tmp_path / "gemma-2-9b"), downgrade_path=str(small)))
    path, rec = resolve_checkpoint(ModelSpec(path=str(tmp_path / "gemma-2-9b"), downgrade_path=str(small), allow_downgrade=True))
    assert path == small and rec["downgraded_from"].endswith("gemma-2-9b")


def test_gemma2_sdpa_is_recorded_as_dropping_softcapping() -> None:
    with pytest.warns(UserWarning, match="DROPS attention softcapping"):
        rec = attention_choice("gemma2", "sdpa")
    assert rec == {"attn_implementation": "sdpa", "softcapping_applied": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention_choice("gemma2", "flex_attention")["softcapping_applied"] is True
        assert "softcapping_applied" not in attention_choice("llama", "sdpa")


def test_load_adapter_dir_equals_peft_model(tmp_path: Path) -> None:
    from peft import LoraConfig, TaskType, get_peft_model

    d = _tiny(tmp_path)
    base, tok = load_classifier(d)
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in peft.named_parameters():  # non-zero B so the adapter changes the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    adir = save_classifier(peft, tok, TINY_FORMAT, tmp_path / "adapter")
    assert json.loads((adir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(d.resolve())
    loaded, _ = load_classifier(adir)
    x = torch.tensor([[tok.bos_token_id, 7, 8, tok.eos_token_id]])
    peft.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, peft(input_ids=x).logits)
    assert "adapter" in loaded.arena_record
