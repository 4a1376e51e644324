"""A tiny random-init Gemma-2 3-way classifier and a word-level tokenizer, built offline.

Shared by the step-6/7 tests (averaging, quantization), which want a model independent of the
project's own model builder (``gpu.models``) so a bug there cannot hide one in averaging or
quantization.
"""

from __future__ import annotations

from typing import Any


def word_tokenizer(vocab: list[str], *, padding_side: str, split_punctuation: bool = True) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` trained on ``vocab`` (plus [PAD], [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    t.train_from_iterator([" ".join(vocab)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]",
                                   padding_side=padding_side, model_max_length=64)


def gemma2_classifier(tok: Any, seed: int = 0) -> Any:
    """A random-init 2-layer, hidden-64 ``Gemma2ForSequenceClassification`` (eager attention)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=32, num_labels=3, pad_token_id=tok.pad_token_id,
                          attn_implementation="eager")
    return Gemma2ForSequenceClassification(config)
