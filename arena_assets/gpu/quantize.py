"""Step 7: 8-bit quantization of the merged model, GPTQ first, bitsandbytes int8 as the fallback.

The methods are tried in ``QuantSettings.methods`` order (default ``gptq → bnb8 → none``); the
first that succeeds AND leaves the 3-way classification head unquantized wins, and
``quantization.json`` records which one was taken and why the earlier ones were not
(``method``, ``fallback_reason``, ``attempts`` with the error of each, timings, sizes, a probe of
the logit change on calibration rows).

``gptq``
    transformers ``GPTQConfig`` → optimum → **GPTQModel** (the 1st place: 8 bits, group size 128,
    128 calibration texts of length 2100). Calibration rows come from the train table and are
    formatted and truncated exactly the way the model was trained (``gpu/formatting.py`` with the
    ``arena_format.json`` saved next to the tokenizer), pre-tokenized so no second tokenization
    can differ. optimum quantizes only the decoder blocks, so ``score`` stays a plain fp
    ``nn.Linear`` (checked, not assumed). The calibration data is removed from the saved
    ``config.json`` (optimum would otherwise store every calibration text in it).
    GPTQModel packs weights into 32-bit words, so every quantized Linear needs in/out features
    divisible by 32; smaller toy models are refused up front (:func:`gptq_shape_problem`) and
    fall back to bnb8 with that reason recorded.
    Why GPTQModel and not auto-gptq: auto-gptq 0.7.1 cannot even be imported under transformers 5
    (``cannot import name 'no_init_weights'``); transformers 5 supports GPTQ only through GPTQModel.
    Why its own environment: GPTQModel 7.6.0 requires protobuf>=7.34 and Dagster requires
    protobuf<7, so GPTQModel lives in ``.venv-quant`` (``scripts/setup-quant-env.sh``) and this
    step runs with :func:`quant_python` (it never imports Dagster). GPTQModel works on CPU (the
    demo) and CUDA. Importing it sets ``PYTORCH_ALLOC_CONF``/``CUDA_DEVICE_ORDER`` and prints a banner.

``bnb8``
    ``BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[head])``: LLM.int8 weights,
    the head skipped. Taken when GPTQ is unavailable (gptqmodel/optimum not importable, e.g. in the
    Dagster venv) or fails (an unsupported model type, a missing kernel). bitsandbytes >= 0.45
    runs int8 on CPU too.

``none``
    The fp model copied unchanged: the last resort, only when listed in ``QuantSettings.methods``.

No Dagster here; torch/transformers are imported inside functions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from arena_assets.core.results import StepResult, step_output
from arena_assets.core.settings import FormatSettings, QuantSettings

log = logging.getLogger(__name__)

QUANT_PYTHON_ENV = "ARENA_QUANT_PYTHON"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_QUANT_VENV = REPO_ROOT / ".venv-quant"
QUANT_FILE = "quantization.json"
N_PROBE = 8
"""Calibration rows also used to measure the logit change fp → quantized (recorded, cheap)."""
SMALL_MODEL_BYTES = 400 * 2**20
"""Below this size GPTQModel's pure-Python packing is used (``GPTQMODEL_DISABLE_PACK_EXT``):
its C++ pack extension costs a one-time JIT build of about a minute, far more than it saves on a
tiny model. Larger models use the extension unless the variable is set explicitly."""


# --------------------------------------------------------------------------------------------
# Where the GPTQ environment is
# --------------------------------------------------------------------------------------------
def quant_python(cfg: QuantSettings | None = None) -> str | None:
    """The interpreter of the GPTQ environment: ``cfg.python``, else ``$ARENA_QUANT_PYTHON``,
    else ``<repo>/.venv-quant/bin/python`` when it exists, else None (run in this interpreter;
    the step then falls back to bnb8 unless gptqmodel happens to be importable here)."""
    if cfg is not None and cfg.python:
        return os.path.expanduser(cfg.python)
    env = os.environ.get(QUANT_PYTHON_ENV)
    if env:
        return os.path.expanduser(env)
    default = DEFAULT_QUANT_VENV / "bin" / "python"
    return str(default) if default.exists() else None


def gptq_unavailable_reason() -> str | None:
    """Why GPTQ cannot run in THIS interpreter, or None when it can."""
    missing = [m for m in ("gptqmodel", "optimum") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not importable in {sys.executable} (GPTQModel lives in its own "
            "environment, .venv-quant: it pins protobuf>=7.34, Dagster <7; run this step with "
            "quant_python())"
        )
    if importlib.util.find_spec("optimum.gptq") is None:
        return "optimum has no optimum.gptq module in this environment"
    return None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _head_name(model: Any) -> str:
    import torch

    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no `score`/`classifier` head")


def _load_fp(model_dir: Path) -> Any:
    """The full-precision model on the step's device (``models.device()``: its GPU, else the
    CPU): the probe's reference logits of a 9B model on a GPU node's CPU took minutes and
    compared numbers from two different devices' kernels."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from arena_assets.gpu.models import device

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    kwargs: dict[str, Any] = {"dtype": "auto", "local_files_only": True}
    if str(config.model_type).startswith("gemma"):
        kwargs["attn_implementation"] = "eager"  # sdpa silently drops Gemma-2 softcapping
    return AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs).to(device()).eval()


def _load_kwargs(model_dir: Path) -> dict[str, Any]:
    """Quantizing ``from_pretrained`` kwargs: on this process's device
    (``models.placement_kwargs``, the same rule as every other model load)."""
    from transformers import AutoConfig

    from arena_assets.gpu.models import cuda_count, local_rank, placement_kwargs

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    kw: dict[str, Any] = {"local_files_only": True, **placement_kwargs(True, cuda_count(), local_rank())}
    if str(config.model_type).startswith("gemma"):
        kw["attn_implementation"] = "eager"
    return kw


def calibration_examples(
    model_dir: Path,
    fmt: FormatSettings,
    calibration_table: str | os.PathLike[str] | None,
    cfg: QuantSettings,
) -> tuple[list[list[int]], str]:
    """Token ids of up to ``cfg.n_calibration`` train rows (seeded sample), formatted as in
    training; returns (ids, how they were formatted)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if calibration_table is None:
        raise ValueError("GPTQ needs calibration rows (calibration_table is None)")
    import pandas as pd

    try:
        from arena_assets.core.contract import read_table

        df = read_table(calibration_table)
    except ImportError:  # pragma: no cover - core.contract is part of the project
        df = pd.read_parquet(calibration_table)
    if len(df) > cfg.n_calibration:
        df = df.sample(n=cfg.n_calibration, random_state=0).reset_index(drop=True)
    max_len = int(cfg.calibration_max_length)
    try:
        from arena_assets.gpu.formatting import encode_rows, load_format

        tf = load_format(model_dir)
        ids = encode_rows(df, tok, tf, max_len, fmt.prompt_max_tokens)
        how = f"gpu.formatting.encode_rows ({'span tags' if tf.span_tags else 'plain headers'}, max_length {max_len})"
    except ImportError:
        texts = [
            " ".join(str(x) for x in (r.prompt, r.response_a, r.response_b))
            for r in df.itertuples()
        ]
        ids = tok(texts, truncation=True, max_length=max_len)["input_ids"]
        how = f"plain joined text (gpu.formatting unavailable), max_length {max_len}"
    ids = [x for x in ids if len(x) > 1]
    if not ids:
        raise ValueError(f"{calibration_table}: no usable calibration rows")
    return ids, how


def _probe_logits(model: Any, examples: Sequence[list[int]]) -> Any:
    import torch

    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for ids in examples:
            x = torch.tensor([ids], device=dev)
            out.append(model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float().cpu())
    return torch.cat(out)


def _devices(model: Any) -> list[str]:
    from arena_assets.gpu.models import model_devices

    return model_devices(model)


def _check_head(model: Any, head: str, original: Any) -> dict[str, Any]:
    """The head must stay a plain fp nn.Linear holding the original weights."""
    import torch

    mod = getattr(model, head)
    if type(mod) is not torch.nn.Linear:
        raise RuntimeError(
            f"the `{head}` head was replaced by {type(mod).__name__}: it must stay unquantized"
        )
    w = mod.weight.detach().float().cpu()
    if not torch.equal(w, original):
        raise RuntimeError(
            f"the `{head}` head's weights changed (max diff {(w - original).abs().max():.3g})"
        )
    return {
        "head": head,
        "head_type": "torch.nn.Linear",
        "head_dtype": str(mod.weight.dtype),
        "head_unchanged": True,
    }


def gptq_shape_problem(model: Any, head: str) -> str | None:
    """GPTQModel packs weights into 32-bit words: every Linear it quantizes (all but the head)
    needs in_features and out_features divisible by 32. Tiny test models (hidden 32, one KV head
    of 16) are not, so GPTQ is refused up front with the offending modules named."""
    import torch

    bad = [
        f"{n} ({m.in_features}x{m.out_features})"
        for n, m in model.named_modules()
        if type(m) is torch.nn.Linear
        and n != head
        and not n.startswith(head + ".")
        and (m.in_features % 32 or m.out_features % 32)
    ]
    if not bad:
        return None
    return (
        f"GPTQModel needs in/out features divisible by 32; {len(bad)} linear layers are not "
        f"(e.g. {', '.join(bad[:3])})"
    )


def _count_quantized(model: Any) -> dict[str, int]:
    import torch

    n_lin = sum(1 for m in model.modules() if type(m) is torch.nn.Linear)
    # GPTQModel's kernels (TorchLinear, TritonV2Linear, MarlinLinear, ...) hold a packed
    # ``qweight``; bitsandbytes' int8 layers are Linear8bitLt. Matching class names alone missed
    # TritonV2Linear: the H200 run recorded 0 quantized layers for a GPTQ model (issue 15).
    n_q = sum(
        1
        for m in model.modules()
        if isinstance(m, torch.nn.Module)
        and type(m) is not torch.nn.Linear
        and (
            hasattr(m, "qweight")
            or any(h in type(m).__name__ for h in ("QuantLinear", "Linear8bit", "QLinear"))
        )
    )
    return {"plain_linear_modules": n_lin, "quantized_linear_modules": n_q}


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------
def _quantize_gptq(
    model_dir: Path,
    out: Path,
    cfg: QuantSettings,
    examples: list[list[int]],
    shape_problem: str | None = None,
) -> tuple[Any, dict]:
    reason = gptq_unavailable_reason()
    if reason:
        raise ModuleNotFoundError(reason)
    if shape_problem:
        raise ValueError(shape_problem)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, len(os.sched_getaffinity(0)))))
    if _dir_bytes(model_dir) < SMALL_MODEL_BYTES:
        os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPTQConfig

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    dataset = [{"input_ids": [ids], "attention_mask": [[1] * len(ids)]} for ids in examples]
    qcfg = GPTQConfig(
        bits=cfg.bits,
        group_size=cfg.group_size,
        dataset=dataset,
        tokenizer=tok,
        model_seqlen=max(len(x) for x in examples),
        desc_act=False,
        sym=True,
        backend=cfg.gptq_backend,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), quantization_config=qcfg, **_load_kwargs(model_dir)
    )
    # The config transformers saves is rebuilt from optimum's dict: (1) it holds the calibration
    # dataset: never ship training rows in config.json; (2) it has lost the kernel: without
    # ``backend`` the saved model said ``auto`` and on the H200 TTA loaded it with GPTQModel's
    # Marlin kernel, which first compiles a CUDA extension with nvcc (about two minutes, in every
    # fresh process) although the step had quantized with TritonV2 (issue 15).
    for qc in (
        getattr(model.config, "quantization_config", None),
        getattr(getattr(model, "hf_quantizer", None), "quantization_config", None),
    ):
        if isinstance(qc, dict):
            qc.update(dataset=None, backend=cfg.gptq_backend)
        elif qc is not None:
            qc.dataset, qc.backend = None, cfg.gptq_backend
    model.save_pretrained(out)
    import gptqmodel

    return model, {
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "library": f"gptqmodel {gptqmodel.__version__}",
        "backend": cfg.gptq_backend,
    }


def _quantize_bnb8(model_dir: Path, out: Path, cfg: QuantSettings, head: str) -> tuple[Any, dict]:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError(f"bitsandbytes not importable in {sys.executable}")
    import bitsandbytes
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    qcfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[head])
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), quantization_config=qcfg, **_load_kwargs(model_dir)
    )
    model.save_pretrained(out)
    return model, {
        "bits": 8,
        "library": f"bitsandbytes {bitsandbytes.__version__}",
        "skip_modules": [head],
    }


def _copy_fp(model_dir: Path, out: Path) -> tuple[Any, dict]:
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if (
            f.is_file()
            and f.suffix in (".safetensors", ".bin", ".json")
            and f.name != "result.json"
        ):
            shutil.copy2(f, out / f.name)
    return _load_fp(out), {"bits": None, "library": None}


def _copy_tokenizer_files(model_dir: Path, out: Path) -> list[str]:
    """Tokenizer, arena_format.json and a spec that never re-quantizes at load time."""
    copied = []
    skip_suffix = (".safetensors", ".bin", ".pt")
    for f in sorted(model_dir.iterdir()):
        if not f.is_file() or f.suffix in skip_suffix or f.name.startswith("."):
            continue
        if (
            f.name in ("config.json", "generation_config.json", "result.json")
            or (out / f.name).exists()
        ):
            continue
        shutil.copy2(f, out / f.name)
        copied.append(f.name)
    try:
        from arena_assets.gpu.average import write_plain_spec

        write_plain_spec(model_dir, out)
    except ImportError:  # pragma: no cover
        pass
    return copied


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------
def quantize(
    model_dir: str | os.PathLike[str],
    cfg: QuantSettings,
    fmt: FormatSettings,
    calibration_table: str | os.PathLike[str] | None,
    *,
    out_dir: str | os.PathLike[str],
) -> StepResult:
    """Quantize the merged model in ``model_dir`` → ``model/`` + tokenizer files and
    ``quantization.json`` (paths keys ``model``, ``quantization``).

    ``calibration_table``: a train-table parquet (GPTQ calibration rows and the probe rows).
    Raises only when every method in ``cfg.methods`` failed (the errors are in the message).
    """
    import torch

    src = Path(model_dir)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src}: not a full model directory (no config.json)")
    with step_output(out_dir, "quantize") as (tmp, result):
        t_all = time.time()
        examples, how = calibration_examples(src, fmt, calibration_table, cfg)
        probe = examples[:N_PROBE]
        t0 = time.time()
        fp = _load_fp(src)
        head = _head_name(fp)
        original_head = getattr(fp, head).weight.detach().float().cpu().clone()
        fp_logits = _probe_logits(fp, probe)
        fp_devices = _devices(fp)
        shape_problem = gptq_shape_problem(fp, head) if "gptq" in cfg.methods else None
        del fp
        if torch.cuda.is_available():  # pragma: no cover - GPU only: room for the quantized copy
            torch.cuda.empty_cache()
        load_fp_s = time.time() - t0

        attempts: list[dict[str, Any]] = []
        chosen: str | None = None
        record: dict[str, Any] = {}
        out = tmp / "model"
        for method in tqdm(cfg.methods, desc="quantize", leave=False):
            t0 = time.time()
            try:
                if method == "gptq":
                    model, info = _quantize_gptq(src, out, cfg, examples, shape_problem)
                elif method == "bnb8":
                    model, info = _quantize_bnb8(src, out, cfg, head)
                elif method == "none":
                    model, info = _copy_fp(src, out)
                else:  # pragma: no cover - pydantic restricts it
                    raise ValueError(f"unknown quantization method {method!r}")
                info.update(_check_head(model, head, original_head))
                info.update(_count_quantized(model))
                q_logits = _probe_logits(model, probe)
                info["devices"] = {"fp_probe": fp_devices, "quantized_probe": _devices(model)}
                diff = (q_logits - fp_logits).abs()
                pdiff = (q_logits.softmax(-1) - fp_logits.softmax(-1)).abs()
                info.update(
                    {
                        "probe_rows": len(probe),
                        "max_abs_logit_diff": float(diff.max()),
                        "mean_abs_prob_diff": float(pdiff.mean()),
                    }
                )
                del model
                attempts.append(
                    {"method": method, "ok": True, "seconds": round(time.time() - t0, 3)}
                )
                chosen, record = method, info
                log.info(
                    "quantized %s with %s (max |logit diff| %.4f)",
                    src,
                    method,
                    info["max_abs_logit_diff"],
                )
                break
            except Exception as e:  # noqa: BLE001 - every failure is recorded and the next method tried
                msg = f"{type(e).__name__}: {e}"
                log.warning("quantization method %s failed: %s", method, msg)
                attempts.append(
                    {
                        "method": method,
                        "ok": False,
                        "error": msg[:2000],
                        "seconds": round(time.time() - t0, 3),
                    }
                )
                shutil.rmtree(out, ignore_errors=True)
            finally:
                if torch.cuda.is_available():  # pragma: no cover - GPU only
                    torch.cuda.empty_cache()
        if chosen is None:
            errors = "; ".join(f"{a['method']}: {a['error']}" for a in attempts)
            raise RuntimeError(f"every quantization method failed ({errors})")
        failed = [a for a in attempts if not a["ok"]]
        skipped = [m for m in ("gptq", "bnb8") if m not in cfg.methods]
        if failed:
            fallback_reason = "; ".join(
                f"{a['method']} failed: {a['error'].splitlines()[0][:300]}" for a in failed
            )
        elif chosen != "gptq" and "gptq" in skipped:
            fallback_reason = f"gptq not in QuantSettings.methods {list(cfg.methods)}"
        else:
            fallback_reason = None
        copied = _copy_tokenizer_files(src, out)
        versions = {
            m: _version(m)
            for m in ("torch", "transformers", "optimum", "gptqmodel", "bitsandbytes")
        }
        qjson = {
            "method": chosen,
            "fallback_reason": fallback_reason,
            "attempts": attempts,
            "methods_order": list(cfg.methods),
            "calibration": {
                "rows": len(examples),
                "format": how,
                "max_tokens": max(len(x) for x in examples),
                "source": str(calibration_table),
            },
            **record,
            "sizes": {"input_bytes": _dir_bytes(src), "output_bytes": _dir_bytes(out)},
            "timings": {
                "load_fp_and_probe_s": round(load_fp_s, 3),
                "quantize_s": attempts[-1]["seconds"],
                "total_s": round(time.time() - t_all, 3),
            },
            "python": sys.executable,
            "versions": versions,
            "tokenizer_files": copied,
        }
        (tmp / QUANT_FILE).write_text(json.dumps(qjson, indent=2, default=str) + "\n")
        result.paths.update({"model": "model", "quantization": QUANT_FILE})
        result.metrics.update(
            {
                "max_abs_logit_diff": record["max_abs_logit_diff"],
                "mean_abs_prob_diff": record["mean_abs_prob_diff"],
                "size_ratio": qjson["sizes"]["output_bytes"]
                / max(1, qjson["sizes"]["input_bytes"]),
            }
        )
        result.info.update(
            {
                "method": chosen,
                "devices": sorted(set(record["devices"]["fp_probe"]) | set(record["devices"]["quantized_probe"])),
                "fallback_reason": fallback_reason,
                "attempts": attempts,
                "python": sys.executable,
            }
        )
        if fallback_reason:
            result.notes.append(f"fallback: {chosen} because {fallback_reason}")
        result.timings.update(qjson["timings"])
    return result


# --------------------------------------------------------------------------------------------
# Entry point for the separate environment
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m arena_assets.gpu.quantize MODEL_DIR OUT_DIR --calibration-table T
    [--settings JSON] [--fmt JSON]``: run the step in this interpreter (the quant env) and print
    the result.json path. JSON: a QuantSettings / FormatSettings object."""
    ap = argparse.ArgumentParser(
        prog="python -m arena_assets.gpu.quantize", description=main.__doc__
    )
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--calibration-table", required=True)
    ap.add_argument("--settings", default="{}", help="QuantSettings as JSON")
    ap.add_argument("--fmt", default="{}", help="FormatSettings as JSON")
    a = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    res = quantize(
        a.model_dir,
        QuantSettings.model_validate_json(a.settings),
        FormatSettings.model_validate_json(a.fmt),
        a.calibration_table,
        out_dir=a.out_dir,
    )
    print(Path(res.out_dir) / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
