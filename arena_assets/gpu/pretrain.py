"""Step 1: post-pretraining a family's base on external pairwise preferences.

Why on the external table only: every Kaggle train row is some fold's validation row; training
the shared base on them would leak all folds' validation labels into every teacher and student.

* Tiny family: a word-level tokenizer is trained on the formatted text of ``corpus`` (train/test
  tables: text only, labels unused — a vocabulary is not a label leak) plus the external table,
  a random-init model is built, then FULLY trained on the external pairs (LoRA on a random-init
  base barely learns: /work/shared/recipes/tiny-demo-learnability.md).
* Real family: the checkpoint is loaded by path (QLoRA per its ``ModelSpec``), LoRA-trained on the
  external pairs and merged into a new base (the base re-loaded unquantized for the merge).
* Disabled, or no external pairs (the seed calls step 1 optional: real data without a
  ``data.external`` file): the base passes through (tiny: built and saved, an UNTRAINED random-init
  model; real: a pointer directory naming the untouched checkpoint, with its tokenizer and format).
  ``result.json`` says so: ``info.post_pretrained`` false, ``info.reason`` and a note; with no
  external pairs a warning is logged too.

The output ``model/`` is a base directory (3-label sequence classifier + tokenizer +
``arena_format.json`` + ``arena_spec.json``) that :func:`models.load_classifier` reads.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from arena_assets.core.artifacts import atomic_write_json
from arena_assets.core.results import StepResult, step_output
from arena_assets.core.settings import FormatSettings, ModelSpec, PostPretrainSettings
from arena_assets.gpu.data import encode_table, read_table
from arena_assets.gpu.formatting import corpus_texts, format_for_spec, save_format
from arena_assets.gpu.models import (
    BASE_POINTER,
    attention_choice,
    build_tiny,
    data_parallel_rank,
    resolve_checkpoint,
    save_classifier,
    setup_torch,
    train_word_tokenizer,
    write_spec,
)

log = logging.getLogger(__name__)

VALID_ROWS = 200
"""External rows held out to report the post-pretrained base's log-loss."""


def external_rows(external: Any) -> int:
    """Rows of the external pairs table (0 when there is none: None or an empty table)."""
    return 0 if external is None else len(read_table(external))


def _external_split(external: Any, cfg: Any) -> tuple[Any, Any]:
    ext = read_table(external).reset_index(drop=True)
    if cfg.max_rows is not None and len(ext) > cfg.max_rows:
        ext = ext.sample(n=cfg.max_rows, random_state=cfg.train.seed).reset_index(drop=True)
    n_valid = min(VALID_ROWS, len(ext) // 10)
    shuffled = ext.sample(frac=1.0, random_state=cfg.train.seed).reset_index(drop=True)
    return shuffled.iloc[n_valid:].reset_index(drop=True), shuffled.iloc[:n_valid].reset_index(drop=True)


def _fingerprint(spec: Any, cfg: Any, fmt: Any) -> dict[str, Any]:
    """What a post-pretraining checkpoint belongs to (``train.fit`` adds the token data's hash).

    Not the init dir's path: it is a fresh staging folder on every run; what it holds follows
    from ``spec`` (and, for a tiny family, the corpus, which the data hash covers through the
    tokenizer's ids)."""
    from arena_assets.gpu.train import result_settings

    return {"step": "post_pretrain", **result_settings(spec=spec, settings=cfg, fmt=fmt)}


def _train_on_external(
    init_dir: Path, spec: Any, cfg: Any, fmt: Any, external: Any, res: Any, tmp: Path, checkpoint_dir: Any = None
) -> Any:
    """Train the base in ``init_dir`` on external pairs; returns (model, tok) merged if LoRA.

    ``checkpoint_dir``: Trainer checkpoints every ``cfg.train.save_steps`` steps, resumed from
    on a re-run (a Slurm time limit or requeue no longer restarts a long epoch from zero)."""
    from arena_assets.gpu.predict import predict_logits, prediction_frame, scores
    from arena_assets.gpu.train import fit, prepare_model

    train_rows, valid_rows = _external_split(external, cfg)
    model, tok, minfo = prepare_model(init_dir, cfg.lora, cfg.train)
    tf = tok.arena_format
    ds = encode_table(train_rows, tok, tf, cfg.train.max_length, fmt.prompt_max_tokens)
    vds = encode_table(valid_rows, tok, tf, cfg.train.max_length, fmt.prompt_max_tokens) if len(valid_rows) else None
    kd = {"alpha": 0.0, "temperature": 1.0, "label_smoothing": cfg.train.label_smoothing}
    trainer, tinfo = fit("post_pretrain", model, tok, cfg.train, ds, vds, kd, checkpoint_dir, _fingerprint(spec, cfg, fmt))
    atomic_write_json(tmp / "history.json", tinfo.pop("history"))
    res.paths["history"] = "history.json"
    res.info.update(model=minfo, train=tinfo, external_rows=len(ds), external_valid_rows=len(valid_rows),
                    devices=tinfo["devices"])
    model = trainer.model
    if len(valid_rows):
        s = scores(prediction_frame(valid_rows["id"], predict_logits(model, tok, valid_rows, cfg.train.max_length, fmt.prompt_max_tokens, 32)), valid_rows)
        res.metrics.update(valid_logloss=s["logloss"], valid_accuracy=s["accuracy"])
    res.metrics["train_loss"] = tinfo["train_loss"]
    return model, tok


def _merge(model: Any, tok: Any, spec: Any, init_dir: Path, tmp: Path) -> Any:
    """merge_and_unload; a 4/8-bit base is re-loaded unquantized first (merging into bnb
    weights would re-quantize the merged base)."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return model.merge_and_unload()
    from peft import PeftModel

    from arena_assets.gpu.models import load_classifier

    adir = tmp / "_adapter"
    model.save_pretrained(str(adir))
    base, _ = load_classifier(init_dir, spec.model_copy(update={"quantize_base": "none"}))
    merged = PeftModel.from_pretrained(base, str(adir)).merge_and_unload()
    shutil.rmtree(adir, ignore_errors=True)
    return merged


def post_pretrain(
    spec: ModelSpec, cfg: PostPretrainSettings, fmt: FormatSettings, external: Any, corpus: list[Any], *,
    out_dir: Any, checkpoint_dir: Any = None, external_source: str | None = None
) -> StepResult | None:
    """Step 1 (see the module doc). ``corpus``: tables whose TEXT trains a tiny tokenizer.

    ``external_source``: where the external table came from, for the messages only (e.g.
    ``data.external=/data/ext.csv missing``): with no external rows the reason reads
    ``no external pairs (<external_source>)``.

    ``checkpoint_dir`` (optional, keyed like ``train.checkpoint_dir_for``): the training on the
    external pairs saves checkpoints there and a re-run resumes from the last complete one;
    None trains without checkpoints.

    In data-parallel training (``RANK`` > 0: Slurm ``tasks_per_node`` > 1 or torchrun) a rank
    runs the same deterministic step into a scratch folder and returns None: rank 0 alone writes.
    """
    if data_parallel_rank() != 0:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="arena-rank-") as scratch:
            _post_pretrain(spec, cfg, fmt, external, corpus, out_dir=Path(scratch) / "out",
                           checkpoint_dir=checkpoint_dir, external_source=external_source)
        return None
    return _post_pretrain(spec, cfg, fmt, external, corpus, out_dir=out_dir, checkpoint_dir=checkpoint_dir,
                          external_source=external_source)


def _post_pretrain(
    spec: Any, cfg: Any, fmt: Any, external: Any, corpus: list[Any], *, out_dir: Any, checkpoint_dir: Any = None,
    external_source: str | None = None
) -> StepResult:
    setup_torch(cfg.train.seed)
    tf = format_for_spec(spec)
    n_ext = external_rows(external)
    if not n_ext:
        external = None  # an empty table is no external pairs (nothing to train on, no text, no ids)
    with step_output(out_dir, "post_pretrain") as (tmp, res):
        init = tmp / "_init"
        if spec.is_tiny:
            tables = [read_table(p) for p in corpus or []]
            if external is not None:
                tables.append(read_table(external))
            if not tables:
                raise ValueError("a tiny family needs text (corpus or external) to train its tokenizer")
            tok = train_word_tokenizer(corpus_texts(tables, tf), spec.tiny.vocab_size, spec.tiny.max_position_embeddings)
            model = build_tiny(spec.tiny, tok, spec.attn_implementation, spec.dtype)
            save_classifier(model, tok, tf, init)
            write_spec(spec, init)
            res.info["built"] = {
                "tiny": spec.tiny.model_dump(),
                "vocab_size": len(tok),
                "dtype": spec.dtype,
                **attention_choice(model.config.model_type, spec.attn_implementation, model.config),
            }
            del model  # training re-loads it from `init` (QLoRA, LoRA): free its memory first
            if corpus and external is not None:
                ext_ids = set(read_table(external)["id"].astype(str))
                # the corpus may hold the external table itself (the asset passes it for its text)
                others = [t for p, t in zip(corpus, tables) if Path(p).resolve() != Path(external).resolve()]
                shared = sum(len(ext_ids & set(t["id"].astype(str))) for t in others)
                if shared:
                    log.warning("%d external ids also appear in the corpus tables (ids only; check the sources)", shared)
                res.info["external_ids_in_corpus"] = shared
        else:
            path, drec = resolve_checkpoint(spec)
            res.info["source"] = {"requested": spec.path, **drec}
            from arena_assets.gpu.models import _load_tokenizer, model_record

            init.mkdir()
            (init / BASE_POINTER).write_text(json.dumps({"path": str(path.resolve())}, indent=2) + "\n")
            _load_tokenizer(spec.tokenizer_path or path).save_pretrained(str(init))
            save_format(tf, init)
            write_spec(spec, init)
            res.info["built"] = model_record(path)
        if cfg.enabled and external is not None:
            model, tok = _train_on_external(init, spec, cfg, fmt, external, res, tmp, checkpoint_dir)
            if cfg.lora.enabled:
                model = _merge(model, tok, spec, init, tmp)
            merged_spec = spec.model_copy(update={"path": None}) if spec.is_tiny else spec
            save_classifier(model, tok, tok.arena_format, tmp / "model")
            write_spec(merged_spec, tmp / "model")
            shutil.rmtree(init)
            res.info["post_pretrained"] = True
        else:
            if not cfg.enabled:
                reason = "post_pretrain.enabled is false"
            else:
                reason = f"no external pairs ({external_source or 'the external table is empty'})"
            what = "an untrained random-init tiny model" if spec.is_tiny else "the untouched checkpoint"
            note = f"base NOT post-pretrained, passed through ({what}): {reason}"
            if cfg.enabled:
                log.warning("post-pretraining skipped: %s", note)
            res.notes.append(note)
            init.rename(tmp / "model")
            res.info.update(post_pretrained=False, reason=reason, external_rows=0)
        res.info["random_init"] = bool(spec.is_tiny and not res.info["post_pretrained"])
        res.info["format"] = tf.to_json()
        res.paths["model"] = "model"
    return StepResult.read(out_dir)
