"""Fixtures for the model steps: a small known-answer sample and a tiny post-pretrained base.

Everything is real (transformers/peft models built from configs, a tokenizer trained on the
data) and offline; sizes are chosen so the whole folder runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from typing import Any

import pytest

from arena_assets.core.settings import (
    FormatSettings,
    InferSettings,
    KDSettings,
    LoraSettings,
    ModelSpec,
    PostPretrainSettings,
    StudentSettings,
    TeacherSettings,
    TinyModelConfig,
    TrainSettings,
)

MAX_LEN = 128

TINY = TinyModelConfig(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    intermediate_size=128, max_position_embeddings=512,
)
FMT = FormatSettings(max_length=MAX_LEN, prompt_max_tokens=24)
INFER = InferSettings(max_length=MAX_LEN, batch_size=32)
PRE = PostPretrainSettings(
    train=TrainSettings(learning_rate=4e-3, per_device_batch_size=16, max_length=MAX_LEN, num_epochs=2,
                        lr_scheduler="linear", warmup_steps=10, logging_steps=10),
)
FIT = TrainSettings(learning_rate=1e-3, per_device_batch_size=16, max_length=MAX_LEN, num_epochs=1,
                    warmup_steps=2, logging_steps=5, save_steps=10)
LORA = LoraSettings(r=8, alpha=16)
TEACHER = TeacherSettings(train=FIT, lora=LORA, use_external=False)
RESUME_TEACHER = TeacherSettings(
    train=FIT.model_copy(update={"num_epochs": 3, "save_steps": 4, "eval_steps": 0}), lora=LORA, use_external=False
)
STUDENT = StudentSettings(train=FIT, lora=LORA, kd=KDSettings(alpha=0.5, temperature=2.0))


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The known-answer sample as contract parquet tables, split into 2 folds."""
    from arena_assets.core import contract
    from arena_assets.core.folds import make_folds, split_fold
    from arena_assets.core.sample import make_sample

    root = tmp_path_factory.mktemp("sample")
    s = make_sample(root / "raw", train_rows=500, test_rows=120, external_rows=2400, seed=11)
    train = contract.read_train(s["train"])
    out: dict[str, Any] = {"summary": s}
    for name, df in (("train", train), ("test", contract.read_test(s["test"])),
                     ("external", contract.read_external(s["external"]))):
        out[name] = contract.write_table(df, root / f"{name}.parquet")
    folds = make_folds(train, n_folds=2, seed=42)
    for k in range(2):
        a, b = split_fold(train, folds, k)
        out[f"train{k}"] = contract.write_table(a, root / f"fold{k}_train.parquet")
        out[f"valid{k}"] = contract.write_table(b, root / f"fold{k}_valid.parquet")
    out["root"] = root
    return out


@pytest.fixture(scope="session")
def base(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny Gemma-2 post-pretrained (full fine-tuning) on the external pairs."""
    from arena_assets.gpu.pretrain import post_pretrain

    out = tmp_path_factory.mktemp("pp") / "v1"
    return post_pretrain(ModelSpec(tiny=TINY), PRE, FMT, data["external"], [data["train"], data["test"]], out_dir=out)


@pytest.fixture(scope="session")
def teacher(data: dict[str, Any], base: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from arena_assets.gpu.train import train_teacher

    out = tmp_path_factory.mktemp("teacher") / "v1"
    return train_teacher(base.path("model"), TEACHER, FMT, data["train0"], data["valid0"], data["external"], out_dir=out)
