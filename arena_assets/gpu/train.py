"""Teachers (step 3) and the distilled student (step 5) through the transformers Trainer.

Both are sequence classifiers trained the same way; they differ in data and loss:

* a teacher trains on its fold's train part (+ optional external rows) with label-smoothed CE;
* a student trains on the fold's train part with :func:`arena_assets.gpu.losses.kd_loss` against
  the teacher OOF probabilities of those rows (each from a teacher that never saw the row);
  ``alpha=0`` (or no OOF) is the CE-only baseline, the same function.

Why the Trainer (subclassed only for ``compute_loss``): length-grouped batches, gradient
accumulation, cosine schedule with warm-up, bf16, gradient checkpointing and — above all —
checkpoints that a re-run resumes from (optimizer, scheduler, RNG and data order included).

Checkpoints: ``checkpoint_dir`` is chosen by the caller, keyed by step, fold, settings hash and
input data version (:func:`checkpoint_dir_for`), so a re-run resumes and any change starts
afresh in another directory. As a second guard the directory holds ``arena_fingerprint.json``
(settings, base and data hash); a directory with another fingerprint is refused.

LoRA: the adapter init is seeded with ``lora.init_seed`` right before ``get_peft_model`` so every
fold starts from the SAME adapter (plain averaging of fold adapters needs it). Real bases may be
loaded 4/8-bit (QLoRA) per their ``ModelSpec``; tiny bases use plain LoRA or full fine-tuning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arena_assets.core.artifacts import atomic_write_json
from arena_assets.core.results import StepResult, step_output
from arena_assets.core.settings import FormatSettings, StudentSettings, TeacherSettings
from arena_assets.gpu.data import (
    PadCollator,
    PairDataset,
    encode_table,
    read_table,
    teacher_logits_for,
)
from arena_assets.gpu.formatting import LABEL_COLUMNS, labels_of

log = logging.getLogger(__name__)

FINGERPRINT = "arena_fingerprint.json"


def result_settings(**objs: Any) -> dict[str, Any]:
    """The settings a checkpoint belongs to: the fields that change results (core/versions.py),
    not the speed-only ones, so halving the per-device batch against an out-of-memory error (same
    global batch) or changing a logging interval still resumes the checkpoint."""
    import os

    from arena_assets.core.versions import ViewContext, flatten

    from arena_assets.core import settings as S

    def plain(obj: Any) -> Any:
        # a fresh copy of the declared settings class, made from a dump: fingerprinting looks at
        # every field without using it (tests/gpu/test_versions_oracle.py records field reads)
        cls = next(c for c in type(obj).__mro__ if getattr(S, c.__name__, None) is c)
        return cls.model_validate(obj.model_dump())

    ctx = ViewContext(ranks=max(1, int(os.environ.get("WORLD_SIZE", "1") or 1)))
    return {name: flatten(plain(obj), name, ctx) for name, obj in objs.items()}
TABLE_COLUMNS = ["id", "prompt", "response_a", "response_b", *LABEL_COLUMNS]


def checkpoint_dir_for(root: str | os.PathLike[str], step: str, fold: int | str, settings_hash: str, data_version: str) -> Path:
    """``<root>/<step>/<fold>/<settings hash>-<data version>``: same inputs resume, changes don't."""
    return Path(root) / step / str(fold) / f"{settings_hash}-{data_version}"


# ----------------------------------------------------------------------------------- Trainer
def _make_trainer_cls() -> Any:
    from transformers import Trainer

    from arena_assets.gpu.losses import kd_loss

    class ArenaTrainer(Trainer):
        """Trainer whose loss is :func:`kd_loss` (CE when no teacher); eval loss is plain CE,
        i.e. the validation log-loss.

        Gradient accumulation: :func:`kd_loss` is a per-row MEAN of one micro-batch and never
        sees ``num_items_in_batch``, so the Trainer must divide it by ``grad_accum`` itself. It
        skips that division when it thinks the model normalised the loss over the whole
        accumulated batch, which it infers from the model's forward accepting ``**kwargs``
        (Gemma-2's classifier does): grad_accum 4 then trained and logged a 4x loss and 4x
        gradients. Both switches below say "not scaled": ``loss_is_scaled_for_ga`` (the
        documented hook of recent transformers) and ``model_accepts_loss_kwargs`` (what older
        5.x releases read)."""

        loss_is_scaled_for_ga = False

        def __init__(self, *args: Any, kd: dict[str, float], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.kd = kd
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            labels = inputs.pop("labels")
            teacher = inputs.pop("teacher_logits", None)
            if "seq_ends" in inputs:  # a packed slab (TrainSettings.packing, gpu/packing.py)
                from transformers.modeling_outputs import SequenceClassifierOutput

                from arena_assets.gpu.packing import packed_from_inputs, packed_logits

                outputs = SequenceClassifierOutput(logits=packed_logits(model, packed_from_inputs(inputs)))
            else:
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            if model.training:
                loss, _ = kd_loss(outputs.logits, labels, teacher, **self.kd)
            else:
                loss, _ = kd_loss(outputs.logits, labels, None, alpha=0.0, temperature=1.0)
            return (loss, outputs) if return_outputs else loss

    return ArenaTrainer


def _training_args(cfg: Any, output_dir: str, save: bool, has_eval: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    eval_strategy = "steps" if (has_eval and cfg.eval_steps > 0) else "no"
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.per_device_batch_size,
        # a fixed packed slab holds per_device_batch_size rows (TrainSettings checks it), not 16
        per_device_eval_batch_size=(cfg.per_device_batch_size if cfg.packing and cfg.packing_slab_tokens
                                    else max(cfg.per_device_batch_size, 16)),
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps if eval_strategy == "steps" else None,
        save_strategy="steps" if save else "no",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bool(cfg.bf16 and cuda),
        fp16=bool(cfg.fp16 and cuda),
        use_cpu=not cuda,
        **({"gradient_checkpointing": True} if cfg.gradient_checkpointing else {}),
        dataloader_num_workers=cfg.dataloader_workers,
        **_length_grouping(cfg.group_by_length),
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # LoRA or full fine-tuning: every trainable param is used each step
        label_names=["labels"],
        report_to="none",
        disable_tqdm=False,
    )
    return one_gpu_per_process(args)


def one_gpu_per_process(args: Any) -> Any:
    """Never ``nn.DataParallel``: a process that sees several GPUs trains on one of them.

    Why: outside torch.distributed the Trainer sets ``n_gpu`` to every visible GPU, wraps the
    model in ``nn.DataParallel`` and multiplies the per-device batch by ``n_gpu`` — a different
    global batch than the settings say, a 4/8-bit base (pinned to one GPU) that cannot be
    replicated, and a slow single-process scatter/gather. Data parallelism here is one rank per
    GPU (``StepNeeds.tasks_per_node`` = ``gpus``, DDP); a lone process uses its own GPU only.
    ``_n_gpu = 1`` is what the Trainer itself sets for model-parallel models. Under DDP
    ``n_gpu`` is already 1."""
    n = args.n_gpu  # resolves the device (and the process group, under DDP)
    if n > 1:
        log.warning(
            "one process sees %d GPUs: training on %s only (no nn.DataParallel); use one rank per GPU "
            "(compute.needs.<step>.tasks_per_node = gpus) to train on all of them", n, args.device,
        )
        args._n_gpu = 1
    return args


def make_collator(cfg: Any, pad_id: int) -> Any:
    """Padded batches, or with ``cfg.packing`` one packed slab per batch (no pad tokens computed;
    pair it with ``attn_implementation="arena_flex"`` on GPUs, see gpu/packing.py)."""
    if getattr(cfg, "packing", False):
        from arena_assets.gpu.packing import PackedCollator

        return PackedCollator(pad_id, slab_tokens=cfg.packing_slab_tokens)
    return PadCollator(pad_id)


def _length_grouping(on: bool) -> dict[str, Any]:
    """transformers >= 5.2x: ``train_sampling_strategy``; older 5.x: ``group_by_length``."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length" if on else "random"}
    return {"group_by_length": on}


def _last_complete_checkpoint(folder: Path) -> str | None:
    """The newest ``checkpoint-N`` that finished saving (its trainer_state.json is written last)."""
    best = None
    for d in folder.glob("checkpoint-*"):
        try:
            n = int(d.name.split("-")[-1])
        except ValueError:
            continue
        if (d / "trainer_state.json").exists() and (best is None or n > best[0]):
            best = (n, d)
    return str(best[1]) if best else None


def _data_hash(ds: PairDataset) -> str:
    h = hashlib.sha256()
    for x in ds.input_ids:
        h.update(np.asarray(x, dtype=np.int32).tobytes())
        h.update(b"|")
    if ds.labels is not None:
        h.update(np.ascontiguousarray(ds.labels, dtype=np.float32).tobytes())
    if ds.teacher_logits is not None:
        h.update(np.ascontiguousarray(ds.teacher_logits, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _check_fingerprint(ckpt: Path, fingerprint: dict[str, Any]) -> None:
    f = ckpt / FINGERPRINT
    if f.exists():
        old = json.loads(f.read_text())
        if old != fingerprint:
            raise ValueError(
                f"checkpoint dir {ckpt} belongs to other settings or data "
                f"({ {k: (old.get(k), v) for k, v in fingerprint.items() if old.get(k) != v} }); "
                "key checkpoint_dir by settings hash and data version (train.checkpoint_dir_for)"
            )
    else:
        ckpt.mkdir(parents=True, exist_ok=True)
        atomic_write_json(f, fingerprint)


# ----------------------------------------------------------------------------------- model prep
def prepare_model(base_dir: str | os.PathLike[str], lora: Any, cfg: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Load the base for training; wrap it in LoRA (seeded init) or leave it fully trainable."""
    import torch

    from arena_assets.gpu.models import device, load_classifier, param_count

    # its arena_spec.json says how; a head the base lacks starts from lora.init_seed in every fold
    model, tok = load_classifier(Path(base_dir).resolve(), init_seed=lora.init_seed)
    info: dict[str, Any] = {"base": getattr(model, "arena_record", {})}
    kbit = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    if lora.enabled:
        from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

        if kbit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        lcfg = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
        )
        torch.manual_seed(lora.init_seed)  # the same adapter init in every fold (averaging needs it)
        model = get_peft_model(model, lcfg)
        info["lora"] = {"r": lora.r, "alpha": lora.alpha, "init_seed": lora.init_seed, "qlora": kbit}
    elif kbit:
        raise ValueError("full fine-tuning of a 4/8-bit base is impossible: enable LoRA or load the base unquantized")
    if not kbit:
        model.to(device())
    info.update(param_count(model))
    return model, tok, info


# ----------------------------------------------------------------------------------- the fit
def fit(
    step: str,
    model: Any,
    tok: Any,
    cfg: Any,
    train_ds: PairDataset,
    valid_ds: PairDataset | None,
    kd: dict[str, float],
    checkpoint_dir: str | os.PathLike[str] | None,
    fingerprint: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """Run the Trainer (resuming from ``checkpoint_dir`` if it holds a complete checkpoint)."""
    from arena_assets.gpu.models import model_devices, setup_torch

    setup_torch(cfg.seed)
    scratch = None
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir)
        fingerprint = {**fingerprint, "data": _data_hash(train_ds)}
        _check_fingerprint(ckpt, fingerprint)
        output_dir, resume = str(ckpt), _last_complete_checkpoint(ckpt)
    else:
        scratch = tempfile.mkdtemp(prefix=f"arena-{step}-")
        output_dir, resume = scratch, None
    args = _training_args(cfg, output_dir, save=checkpoint_dir is not None, has_eval=valid_ds is not None)
    if getattr(cfg, "compile", False):
        import torch

        if torch.cuda.is_available():
            from arena_assets.gpu.fast import compile_layers

            compile_layers(model, dynamic=False)
    trainer = _make_trainer_cls()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=valid_ds,
        data_collator=make_collator(cfg, tok.pad_token_id),
        processing_class=tok,
        kd=kd,
    )
    info: dict[str, Any] = {"resumed_from": resume, "world_size": int(args.world_size)}
    if resume:
        log.info("%s: resuming from %s", step, resume)
        info["resumed_global_step"] = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
    try:
        out = trainer.train(resume_from_checkpoint=resume)
        info["train_loss"] = float(out.training_loss)
        info["global_step"] = int(trainer.state.global_step)
        info["devices"] = model_devices(trainer.model)
        if valid_ds is not None:
            ev = trainer.evaluate()
            info["final_eval_loss"] = float(ev["eval_loss"])
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    info["history"] = trainer.state.log_history
    return trainer, info


def _fit_classifier(
    step: str,
    base_dir: Any,
    cfg: Any,
    lora: Any,
    fmt: Any,
    rows: Any,
    valid: Any,
    kd: dict[str, float],
    teacher: np.ndarray | None,
    out_dir: Any,
    checkpoint_dir: Any,
    extra_info: dict[str, Any],
    notes: Sequence[str] = (),
) -> StepResult | None:
    from arena_assets.gpu.models import data_parallel_rank, read_spec, save_classifier, write_spec
    from arena_assets.gpu.predict import predict_logits, prediction_frame, scores, write_parquet

    model, tok, minfo = prepare_model(base_dir, lora, cfg.train)
    tcfg = cfg.train
    tf = tok.arena_format
    train_ds = encode_table(rows, tok, tf, tcfg.max_length, fmt.prompt_max_tokens, teacher_logits=teacher)
    valid_ds = encode_table(valid, tok, tf, tcfg.max_length, fmt.prompt_max_tokens)
    fingerprint = {
        "step": step,
        **result_settings(cfg=cfg, fmt=fmt),
        "base": str(Path(base_dir).resolve()),
    }
    if data_parallel_rank() != 0:  # a data-parallel rank (Slurm tasks_per_node > 1, torchrun): train, write nothing
        fit(step, model, tok, tcfg, train_ds, valid_ds, kd, checkpoint_dir, fingerprint)
        return None
    with step_output(out_dir, step) as (tmp, res):
        trainer, tinfo = fit(step, model, tok, tcfg, train_ds, valid_ds, kd, checkpoint_dir, fingerprint)
        history = tinfo.pop("history")
        model = trainer.model
        z = predict_logits(model, tok, valid, tcfg.max_length, fmt.prompt_max_tokens, batch_size=32, desc=f"{step} valid")
        pred = prediction_frame(valid["id"], z)
        write_parquet(pred, tmp / "valid_predictions.parquet")
        s = scores(pred, valid)
        save_classifier(model, tok, tf, tmp / "model")
        write_spec(read_spec(base_dir), tmp / "model")  # how to load it (dtype, attention, QLoRA)
        atomic_write_json(tmp / "history.json", history)
        res.metrics.update(valid_logloss=s["logloss"], valid_accuracy=s["accuracy"], train_loss=tinfo["train_loss"])
        res.paths.update(model="model", valid_predictions="valid_predictions.parquet", history="history.json")
        res.info.update(model=minfo, train=tinfo, train_rows=len(train_ds), valid_rows=len(valid_ds),
                        devices=tinfo["devices"], **extra_info)
        res.notes.extend(notes)
        log.info("%s: valid log-loss %.4f, accuracy %.3f", step, s["logloss"], s["accuracy"])
    return StepResult.read(out_dir)


def _rows(df: Any) -> Any:
    return df[[c for c in TABLE_COLUMNS if c in df.columns]].reset_index(drop=True)


# ----------------------------------------------------------------------------------- steps
def train_teacher(
    base_dir: Any,
    cfg: TeacherSettings,
    fmt: FormatSettings,
    train_table: Any,
    valid_table: Any,
    external: Any,
    *,
    out_dir: Any,
    checkpoint_dir: Any = None,
    external_source: str | None = None,
) -> StepResult | None:
    """Step 3: one teacher for one fold and family (fold's train part + optional external rows).

    External rows are optional (the seed's step 3): with ``use_external`` and no external pairs
    (``external`` None or an empty table) the teacher trains on its fold alone, logs a warning and
    says why in ``result.json`` (``info.external_reason``, a note). ``external_source``: where the
    external table came from, for those messages only (e.g. ``data.external=/data/ext.csv missing``).
    """
    valid = read_table(valid_table)
    rows, n_ext, info, notes = teacher_training_rows(read_table(train_table), valid, external, cfg, external_source)
    kd = {"alpha": 0.0, "temperature": 1.0, "label_smoothing": cfg.train.label_smoothing}
    return _fit_classifier(
        "teacher", base_dir, cfg, cfg.lora, fmt, rows, valid, kd, None, out_dir, checkpoint_dir,
        {"external_rows": n_ext, **info}, notes,
    )


def teacher_training_rows(
    train: Any, valid: Any, external: Any, cfg: TeacherSettings, external_source: str | None = None
) -> tuple[Any, int, dict[str, Any], list[str]]:
    """The rows a fold's teacher trains on: the fold's train part plus, with ``use_external``, up to
    ``max_external_rows`` external pairs (seeded sample; none may share an id with the validation
    fold). Returns ``(rows, n_external, info, notes)``; benchmarks count the teacher's tokens on it."""
    import pandas as pd

    rows, n_ext, notes = _rows(train), 0, []
    ext = _rows(read_table(external)) if cfg.use_external and external is not None else None
    info: dict[str, Any] = {}
    if not cfg.use_external:
        info["external_reason"] = "teacher.use_external is false"
    elif ext is None or not len(ext):
        reason = f"no external pairs ({external_source or 'the external table is empty'})"
        info["external_reason"] = reason
        notes.append(f"teacher trained without external rows (teacher.use_external is true): {reason}")
        log.warning("%s", notes[-1])
    else:
        if cfg.max_external_rows is not None and len(ext) > cfg.max_external_rows:
            ext = ext.sample(n=cfg.max_external_rows, random_state=cfg.train.seed)
        overlap = set(ext["id"].astype(str)) & set(valid["id"].astype(str))
        if overlap:
            raise ValueError(f"{len(overlap)} external rows share ids with the validation fold")
        n_ext = len(ext)
        rows = pd.concat([rows, ext], ignore_index=True)
    return rows, n_ext, info, notes


def calibrated_teacher_logits(
    teacher: np.ndarray, folds: np.ndarray, labels: np.ndarray, max_iter: int = 100
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Teacher logits (n, F, 3) with each family's rows of each OOF fold divided by the temperature
    fitted on those rows' ``labels`` (``gpu.calibrate.fit_temperature``; T=1 kept if not better).

    The rows of OOF fold j are teacher j's held-out fold, all of which a student of another fold
    trains on: the fit reads only the student's own training rows and labels (fold-honest).
    Returns the scaled logits and, per family, ``{fold: T}`` (a fold of -1: the OOF had no fold
    column, one temperature for all rows)."""
    from arena_assets.gpu.calibrate import fit_temperature

    out = np.array(teacher, dtype=np.float32, copy=True)
    folds = np.asarray(folds)
    temps: list[dict[str, float]] = []
    for j in range(out.shape[1]):
        per: dict[str, float] = {}
        for fold in sorted(set(folds.tolist())):
            m = folds == fold
            t, _, _ = fit_temperature(out[m, j].astype(np.float64), labels[m], max_iter)
            out[m, j] = (out[m, j].astype(np.float64) / t).astype(np.float32)
            per[str(int(fold))] = float(t)
        temps.append(per)
    return out, temps


def train_student(
    base_dir: Any,
    cfg: StudentSettings,
    fmt: FormatSettings,
    train_table: Any,
    valid_table: Any,
    teacher_oof: Any,
    *,
    out_dir: Any,
    checkpoint_dir: Any = None,
) -> StepResult | None:
    """Step 5: the KD student of one fold (``teacher_oof`` None or alpha=0: the CE-only baseline)."""
    train, valid = read_table(train_table), read_table(valid_table)
    rows = _rows(train)
    k = cfg.kd
    use_kd = teacher_oof is not None and (k.alpha > 0 or k.mse_weight > 0 or k.cos_weight > 0)
    teacher, extra = None, {"kd": use_kd}
    if use_kd:
        oof = read_table(teacher_oof)
        teacher, fams, folds = teacher_logits_for(oof, rows["id"].tolist(), k.teacher_families)
        vid = set(valid["id"].astype(str))
        vfolds = set(oof.loc[oof["id"].astype(str).isin(vid), "fold"].astype(int)) if "fold" in oof else set()
        if vfolds and np.isin(folds, list(vfolds)).any():
            raise ValueError(
                f"teacher OOF folds {sorted(vfolds)} of this validation fold also cover train rows: "
                "the OOF and the fold assignment disagree (teacher probs would leak)"
            )
        extra.update(teacher_families=fams)
        if k.calibrate_teacher:
            teacher, temps = calibrated_teacher_logits(teacher, folds, labels_of(rows))
            extra.update(teacher_temperatures={f: temps[j] for j, f in enumerate(fams)})
    kdd = {
        "alpha": k.alpha if use_kd else 0.0,
        "temperature": k.temperature,
        "label_smoothing": k.label_smoothing,
        "mse_weight": k.mse_weight if use_kd else 0.0,
        "cos_weight": k.cos_weight if use_kd else 0.0,
    }
    return _fit_classifier("student", base_dir, cfg, cfg.lora, fmt, rows, valid, kdd, teacher, out_dir, checkpoint_dir, extra)
