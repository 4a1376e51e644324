"""Inference: teacher OOF (step 4), fold submissions, and TTA inference of the final model (step 8).

Batches are sorted by token length and padded per batch only (dynamic padding), so a length-sorted
run spends almost nothing on pad tokens. TTA: the model sees each row as given and with A and B
exchanged; the swapped logits are mapped back (A<->B columns) and the two logit vectors averaged
(equivalently a normalised geometric mean of the two probability vectors). This makes the output
exactly mirror-symmetric: predicting a swapped row gives the swapped probabilities. Calibration
divides the averaged logits by the fold's temperature before the softmax. The prediction table
keeps the uncalibrated logits so any later calibration can start from them.

The temperatures are fitted on logits of the same kind (issue 15): ``gpu.calibrate.calibrate``
runs the fold model on its held-out rows through :func:`_tta_runner`, the runner both submissions
use, with the same ``fmt``/``infer``. So a fold submission's ``cv_logloss`` is computed on the
very logits its temperature minimises (it equals the calibration's ``cv_logloss`` up to float
rounding), and the merged model's temperature (the mean of the fold ones) is a mean of
temperatures fitted on TTA logits.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from arena_assets.core.artifacts import atomic_path
from arena_assets.core.metrics import softmax
from arena_assets.core.results import StepResult, step_output
from arena_assets.core.settings import FormatSettings, InferSettings
from arena_assets.gpu.data import PadCollator, read_table
from arena_assets.gpu.formatting import encode_rows, labels_of, swap_probs
from arena_assets.gpu.models import is_quantized

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ["id", "winner_model_a", "winner_model_b", "winner_tie"]


def predict_logits(
    model: Any,
    tokenizer: Any,
    df: Any,
    max_length: int,
    prompt_max_tokens: int,
    batch_size: int = 16,
    swap: bool = False,
    sort_by_length: bool = True,
    desc: str = "predict",
) -> np.ndarray:
    """(n, 3) float64 logits of ``model`` for the rows of ``df`` (``swap``: A/B exchanged inputs,
    logits returned in the swapped orientation)."""
    import torch
    from tqdm.auto import tqdm

    tf = tokenizer.arena_format
    ids = encode_rows(df, tokenizer, tf, max_length, prompt_max_tokens, swap=swap)
    if _use_fast(model):
        from arena_assets.gpu.packing import SLAB_TOKENS, logits_of_ids_packed, uses_flex

        if uses_flex(model):  # flex compiles per shape: fixed packed slabs, not padded batches
            return logits_of_ids_packed(model, ids, tokenizer.pad_token_id, max(SLAB_TOKENS, max_length), desc=desc)
    n = len(ids)
    order = np.argsort([-len(x) for x in ids], kind="stable") if sort_by_length else np.arange(n)
    collate = PadCollator(tokenizer.pad_token_id)
    out = np.zeros((n, 3), dtype=np.float64)
    was_training = model.training
    model.eval()
    dev = next(p.device for p in model.parameters())
    try:
        with torch.inference_mode():
            for s in tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=n <= batch_size * 4):
                idx = order[s : s + batch_size]
                batch = collate([{"input_ids": ids[i]} for i in idx])
                logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
                out[idx] = logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def _use_fast(model: Any) -> bool:
    """On CUDA, the GPU passes: packed slabs for flex models (``gpu/packing.py``), else
    ``gpu/fast.py``'s token-budget batches (same arithmetic, bf16 rounding aside);
    ``ARENA_FAST_INFER=0`` turns them off."""
    if os.environ.get("ARENA_FAST_INFER", "1") == "0":
        return False
    try:
        dev = next(p.device for p in model.parameters())
    except StopIteration:  # pragma: no cover
        return False
    if dev.type != "cuda":
        return False
    try:
        import arena_assets.gpu.fast  # noqa: F401
    except ImportError:
        return False
    return True


def tta_logits(model: Any, tokenizer: Any, df: Any, fmt: Any, infer: Any, desc: str = "tta",
               max_length: int | None = None, rank: int = 0) -> np.ndarray:
    """Logits in the original orientation; with ``infer.tta`` the mean of original and swapped-back.

    ``max_length``: rows cut to this many tokens instead of ``infer.max_length`` (teacher OOF).
    ``rank``: this process's shard under :func:`sharded_tta_logits` (gpu/compile_cache.py: rank 0
    compiles and writes the portable cache, the others wait for it)."""
    length = int(max_length) if max_length is not None else infer.max_length
    if _use_fast(model):
        from arena_assets.gpu.packing import tta_logits_packed, uses_flex

        if uses_flex(model):  # packed slabs: no pad tokens, block-sparse flex attention
            slab = max(int(infer.slab_tokens), length)
            after_first = None
            if infer.compile and not is_quantized(model):
                from arena_assets.gpu.compile_cache import open_cache
                from arena_assets.gpu.fast import compile_layers

                cc = open_cache(model, infer, rank=rank)  # before the first compiled call
                if cc is not None:

                    def after_first() -> None:  # the graphs exist once the first slab ran
                        cc.save()
                        model.arena_record = {**getattr(model, "arena_record", {}), **cc.record}

                    model.arena_record = {**getattr(model, "arena_record", {}), **cc.record}
                compile_layers(model, dynamic=False)  # idempotent; one shape: the slab
            return tta_logits_packed(
                model, tokenizer, df, length, fmt.prompt_max_tokens, tta=bool(infer.tta), slab_tokens=slab,
                after_first=after_first,
            )
        from arena_assets.gpu.fast import tta_logits_fast

        return tta_logits_fast(model, tokenizer, df, length, fmt.prompt_max_tokens, tta=bool(infer.tta))
    kw = dict(
        max_length=length,
        prompt_max_tokens=fmt.prompt_max_tokens,
        batch_size=infer.batch_size,
        sort_by_length=infer.sort_by_length,
    )
    z = predict_logits(model, tokenizer, df, desc=f"{desc} (original)", **kw)
    if not infer.tta:
        return z
    zs = predict_logits(model, tokenizer, df, swap=True, desc=f"{desc} (A/B swapped)", **kw)
    return 0.5 * (z + swap_probs(zs))


def prediction_frame(ids: Any, logits: np.ndarray, temperature: float = 1.0) -> Any:
    """The contract's prediction table: id, p_a, p_b, p_tie (calibrated), logit_* (raw)."""
    import pandas as pd

    p = softmax(logits, temperature)
    return pd.DataFrame(
        {
            "id": [str(i) for i in ids],
            "p_a": p[:, 0],
            "p_b": p[:, 1],
            "p_tie": p[:, 2],
            "logit_a": logits[:, 0],
            "logit_b": logits[:, 1],
            "logit_tie": logits[:, 2],
        }
    )


def write_parquet(df: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_submission(pred: Any, path: Path) -> None:
    sub = pred.rename(columns={"p_a": "winner_model_a", "p_b": "winner_model_b", "p_tie": "winner_tie"})
    with atomic_path(path) as tmp:
        sub[SUBMISSION_COLUMNS].to_csv(tmp, index=False)


def scores(pred: Any, df: Any) -> dict[str, float]:
    """Log-loss and accuracy of a prediction table against the table's labels (core.metrics)."""
    from arena_assets.core.metrics import accuracy, log_loss

    y = labels_of(df)
    p = pred[["p_a", "p_b", "p_tie"]].to_numpy(dtype=np.float64)
    return {"logloss": log_loss(y, p), "accuracy": accuracy(y, p)}


def read_temperature(calibration_json: str | os.PathLike[str] | None) -> float:
    if calibration_json is None:
        return 1.0
    return float(json.loads(Path(calibration_json).read_text())["temperature"])


def _load(model_dir: Any) -> tuple[Any, Any]:
    """The model on this process's device (``models.device()``: its GPU, else the CPU).

    bitsandbytes/GPTQ models are placed by ``from_pretrained`` (``models.placement_kwargs``: a
    device map to the same device; without it a GPTQ model ran TTA on the CPU of a GPU node);
    the rest are moved there. The steps record where it ended up in ``info["devices"]``."""
    from arena_assets.gpu.models import device, load_classifier, model_devices, setup_torch

    setup_torch(0)
    model, tok = load_classifier(model_dir)
    if not is_quantized(model):  # placed by from_pretrained (a device map); .to would fail or copy
        model.to(device())
    devices = model_devices(model)
    if "cpu" in devices and device().type == "cuda":
        log.warning("%s: parts of the model stay on the CPU (%s) although a GPU is available", model_dir, devices)
    return model, tok


def _devices(model: Any) -> list[str]:
    from arena_assets.gpu.models import model_devices

    return model_devices(model)


def apply_fp8(model: Any, infer: Any, force: bool = False) -> dict[str, Any]:
    """``InferSettings.fp8``: swap the decoder linears for FP8 ones (``fast.fp8_linearize``, row
    scales) when the model is a bf16/fp16 one on a GPU with FP8 tensor cores (sm_89+); else keep
    it and say why. ``force`` applies it anywhere ``torch._scaled_mm`` runs (tests on CPU)."""
    import torch

    scope = getattr(infer, "fp8", "off")
    if scope == "off":
        return {"fp8": "off"}
    p = next(model.parameters())
    why = None
    if is_quantized(model):
        why = "the model is already quantized (GPTQ/bitsandbytes)"
    elif p.dtype not in (torch.bfloat16, torch.float16):
        why = f"FP8 linears need a bf16/fp16 model, not {p.dtype}"
    elif not force and not (p.device.type == "cuda" and torch.cuda.get_device_capability(p.device) >= (8, 9)):
        why = "needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)"
    if why:
        log.warning("InferSettings.fp8=%s not applied: %s", scope, why)
        return {"fp8": "off", "fp8_requested": scope, "fp8_skipped": why}
    from arena_assets.gpu.fast import fp8_linearize

    return {"fp8": scope, "fp8_linears": fp8_linearize(model, scope=scope, granularity="row")}


# --------------------------------------------------------------------------- several GPUs
def inference_devices(infer: Any) -> list[str]:
    """The GPUs (as ``CUDA_VISIBLE_DEVICES`` values) a TTA step shards over; [] = one process."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    want = n if getattr(infer, "gpus", None) is None else min(int(infer.gpus), n)
    return [str(i) for i in range(want)] if want > 1 else []


def _shard_worker(device: str, model_dir: str, fmt: Any, infer: Any, table: str, rows: np.ndarray, desc: str,
                  rank: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """One shard in its own process: sees one GPU (``""``: none, tests), loads the model, runs TTA.
    ``rank`` 0 compiles and writes the portable compile cache, the others wait for it."""
    os.environ["CUDA_VISIBLE_DEVICES"] = device  # before this process first touches CUDA
    model, tok = _load(model_dir)
    fp8 = apply_fp8(model, infer)
    df = read_table(table).iloc[rows].reset_index(drop=True)
    z = tta_logits(model, tok, df, fmt, infer, desc=f"{desc} [gpu {device or 'none'}]", rank=rank)
    # this process sees one GPU as cuda:0: record the job's GPU index instead
    devices = [f"cuda:{device}" if d.startswith("cuda") and device else d for d in _devices(model)]
    return z, {**getattr(model, "arena_record", {}), **fp8, "devices": devices}


def sharded_tta_logits(model_dir: Any, table: Any, fmt: Any, infer: Any, devices: list[str], desc: str = "tta") -> tuple[np.ndarray, dict[str, Any]]:
    """TTA logits of every row of ``table`` with one process per device, rows sharded by length
    (``fast.shard_rows``: the shards finish together) and gathered back in row order.

    Why processes, not threads or DDP: rows are independent (no communication), each process owns
    one GPU and its own compiled model, and a crash names its shard. The 1st place ran the swapped
    orientation on its second GPU; row shards keep both orientations of a row in one packed pass.
    Measured on 2 GPUs: 0.90 of linear scaling with strided shards (docs/gpu.md).
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from arena_assets.gpu.fast import shard_rows

    df = read_table(table)
    lengths = sum(df[c].astype(str).str.len().to_numpy() for c in ("prompt", "response_a", "response_b"))
    shards = [shard_rows(len(df), r, len(devices), lengths) for r in range(len(devices))]
    with ProcessPoolExecutor(max_workers=len(devices), mp_context=mp.get_context("spawn")) as ex:
        futures = [ex.submit(_shard_worker, d, str(model_dir), fmt, infer, str(table), rows, desc, r)
                   for r, (d, rows) in enumerate(zip(devices, shards))]
        results = [f.result() for f in futures]
    z = np.zeros((len(df), 3), dtype=np.float64)
    for rows, (zs, _) in zip(shards, results):
        z[rows] = zs
    record = {**results[0][1], "tta_devices": [d or "cpu" for d in devices]}
    record["devices"] = sorted({d for _, rec in results for d in rec.get("devices", [])})
    return z, record


def _tta_runner(model_dir: Any, fmt: Any, infer: Any) -> tuple[Any, dict[str, Any], int]:
    """``(run, record, gpus)``: ``run(table, desc)`` gives a table's TTA logits on every GPU of the
    job (one process each, :func:`sharded_tta_logits`) or in this process; ``record`` fills with
    the model's provenance as it runs."""
    record: dict[str, Any] = {}
    devices = inference_devices(infer)
    if devices:

        def run(table: Any, desc: str) -> np.ndarray:
            z, rec = sharded_tta_logits(model_dir, table, fmt, infer, devices, desc)
            record.update(rec)
            return z

        return run, record, len(devices)
    model, tok = _load(model_dir)
    record.update(getattr(model, "arena_record", {}))
    record.update(apply_fp8(model, infer))
    record["devices"] = _devices(model)

    def run_here(table: Any, desc: str) -> np.ndarray:
        return tta_logits(model, tok, read_table(table), fmt, infer, desc=desc)

    return run_here, record, 1


# --------------------------------------------------------------------------- steps
def teacher_oof(
    model_dir: Any,
    fmt: FormatSettings,
    infer: InferSettings,
    valid_table: Any,
    fold: int,
    family: str,
    *,
    out_dir: Any,
    max_length: int | None = None,
) -> StepResult:
    """Step 4: a teacher's probabilities for its held-out fold -> ``oof.parquet`` (+ fold, family).

    ``max_length``: the token length rows are cut to, the teacher's own (``TeacherSettings.oof_length``:
    its training length unless ``oof_max_length`` says otherwise). Why not ``infer.max_length``:
    that is the student's TTA length (2000 in the 1st place), longer than the 1024 tokens the
    teachers were trained on; the OOF the student distils from should be what the teacher does
    at its own length. None keeps ``infer.max_length`` (callers that pass nothing)."""
    valid = read_table(valid_table)
    model, tok = _load(model_dir)
    length = int(max_length) if max_length is not None else infer.max_length
    with step_output(out_dir, "teacher_oof") as (tmp, res):
        z = tta_logits(model, tok, valid, fmt, infer, desc=f"teacher {family} fold {fold}", max_length=length)
        pred = prediction_frame(valid["id"], z)
        pred["fold"] = int(fold)
        pred["family"] = str(family)
        write_parquet(pred, tmp / "oof.parquet")
        if "winner_model_a" in valid.columns:
            s = scores(pred, valid)
            res.metrics.update(valid_logloss=s["logloss"], valid_accuracy=s["accuracy"])
        res.paths["oof"] = "oof.parquet"
        res.info.update(model=getattr(model, "arena_record", {}), rows=len(pred), tta=bool(infer.tta),
                        max_length=length, devices=_devices(model))
    return StepResult.read(out_dir)


def fold_submission(
    model_dir: Any,
    calibration_json: Any,
    fmt: FormatSettings,
    infer: InferSettings,
    valid_table: Any,
    test_table: Any,
    *,
    out_dir: Any,
) -> StepResult:
    """A fold model's calibrated OOF (CV metrics) and test submission.

    ``calibration_json``'s temperature was fitted on this model's TTA logits of ``valid_table``
    (``gpu.calibrate``, the same runner), so ``cv_logloss`` <= ``cv_logloss_raw`` (up to float rounding)."""
    valid, test = read_table(valid_table), read_table(test_table)
    run, record, n_gpus = _tta_runner(model_dir, fmt, infer)
    t = read_temperature(calibration_json) if infer.apply_calibration else 1.0
    with step_output(out_dir, "predict") as (tmp, res):
        zv = run(valid_table, "valid")
        raw = scores(prediction_frame(valid["id"], zv), valid)
        oof = prediction_frame(valid["id"], zv, t)
        cal = scores(oof, valid)
        write_parquet(oof, tmp / "oof.parquet")
        zt = run(test_table, "test")
        pred = prediction_frame(test["id"], zt, t)
        write_submission(pred, tmp / "submission.csv")
        write_parquet(pred, tmp / "predictions.parquet")
        res.metrics.update(
            cv_logloss_raw=raw["logloss"], cv_logloss=cal["logloss"], cv_accuracy=cal["accuracy"], temperature=t
        )
        res.paths.update(submission="submission.csv", oof="oof.parquet", predictions="predictions.parquet")
        devices = record.pop("devices", [])
        res.info.update(model=record, tta=bool(infer.tta), test_rows=len(test), gpus=n_gpus, devices=devices)
    return StepResult.read(out_dir)


def tta_submission(
    model_dir: Any,
    calibration_json: Any,
    fmt: FormatSettings,
    infer: InferSettings,
    test_table: Any,
    *,
    out_dir: Any,
    valid_table: Any = None,
) -> StepResult:
    """Step 8: TTA inference of a (merged, quantized) model -> ``submission.csv``, ``predictions.parquet``.

    ``valid_table`` (optional) is scored too (``valid_logloss``); note that for the fold-averaged
    model every train row was seen by four of the five folds, so this is not a CV estimate.
    """
    test = read_table(test_table)
    run, record, n_gpus = _tta_runner(model_dir, fmt, infer)
    t = read_temperature(calibration_json) if infer.apply_calibration else 1.0
    with step_output(out_dir, "tta") as (tmp, res):
        z = run(test_table, "tta test")
        pred = prediction_frame(test["id"], z, t)
        write_parquet(pred, tmp / "predictions.parquet")
        write_submission(pred, tmp / "submission.csv")
        res.metrics["temperature"] = t
        if valid_table is not None:
            valid = read_table(valid_table)
            s = scores(prediction_frame(valid["id"], run(valid_table, "tta valid"), t), valid)
            res.metrics.update(valid_logloss=s["logloss"], valid_accuracy=s["accuracy"])
        res.paths.update(submission="submission.csv", predictions="predictions.parquet")
        devices = record.pop("devices", [])
        res.info.update(model=record, tta=bool(infer.tta), rows=len(pred), gpus=n_gpus, devices=devices)
    return StepResult.read(out_dir)
