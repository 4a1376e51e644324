"""Step 6: average the fold students' LoRA adapters, then merge into the base.

Two ways to average (``AverageSettings.method``):

``mean_adapters`` (default, the seed's and the 1st place's way)
    The plain element-wise mean of every tensor in the fold adapters: each LoRA ``A`` and ``B``
    and the classification head (``score``, saved through peft's ``modules_to_save``). The result
    is again an adapter (``adapter/``). Because ``mean(B) @ mean(A) != mean(B @ A)``, it is only an
    approximation of averaging the fine-tuned models; it works because every fold starts from the
    SAME adapter init (``LoraSettings.init_seed``), so the ``A`` matrices stay close to each other.
    That is why adapters with different configs, ranks or init seeds are refused.

``mean_deltas``
    The exact mean of the weight deltas: ``W + mean_k(scale * B_k @ A_k)`` per LoRA layer and the
    mean of the heads, computed with peft's own ``get_delta_weight`` (so rsLoRA scaling and
    ``fan_in_fan_out`` are handled). The result is a full model (``model/``), which equals the
    mean of the five separately merged models.

Why not ``PeftModel.add_weighted_adapter``: with ``task_type=SEQ_CLS`` peft puts the head in
``modules_to_save`` and ``add_weighted_adapter`` refuses such adapters (peft 0.21). The mean is
taken on the saved adapter tensors instead (the ``get_peft_model_state_dict`` keys), which loads
back with ``set_peft_model_state_dict`` / ``PeftModel.from_pretrained``; ``merge_and_unload`` then
matches the unmerged model to ~1e-7 on CPU in float32.

``merge_adapter`` merges an (averaged) adapter into its base with ``merge_and_unload`` and writes
the full model, the tokenizer and the merged model's temperature: by default the mean of the
fold temperatures (``CalibrationSettings.merged_temperature``: ``mean`` | ``median`` | ``none``).
The merged model was never calibrated on its own (it has no held-out fold: every row was in some
fold's training part), so the fold temperatures are the best available estimate.

No Dagster here; torch/transformers/peft are imported inside functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from arena_assets.core.results import StepResult, step_output
from arena_assets.core.settings import AverageSettings, CalibrationSettings

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LORA_INIT_FILE = "lora_init.json"
"""Optional sidecar a training step may write next to an adapter: ``{"init_seed": int}``."""

CONFIG_KEYS_IGNORED = {"inference_mode", "revision", "peft_version", "auto_mapping"}
"""adapter_config.json keys that may differ between folds without changing the adapter's shape
or meaning."""

MIN_A_COSINE = 0.5
"""Median cosine similarity between a fold's LoRA ``A`` matrices and fold 0's below which the
folds are taken to come from different init seeds. Same-seed folds start identical and stay
close (cosine ~0.9-1.0 after fine-tuning); independent random inits give ~0."""


class AdapterMismatchError(ValueError):
    """Fold adapters that cannot be averaged (different config, rank, base or init seed)."""


# --------------------------------------------------------------------------------------------
# Reading and checking adapters
# --------------------------------------------------------------------------------------------
def _weights_file(adapter_dir: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (adapter_dir / name).exists():
            return adapter_dir / name
    raise FileNotFoundError(f"{adapter_dir}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")


def _load_adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    """The saved adapter tensors: exactly the keys of ``get_peft_model_state_dict``."""
    import torch

    f = _weights_file(adapter_dir)
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    return torch.load(f, map_location="cpu", weights_only=True)


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(adapter_dir) / ADAPTER_CONFIG
    if not p.exists():
        raise FileNotFoundError(
            f"{adapter_dir}: not a peft adapter directory (no {ADAPTER_CONFIG})"
        )
    return json.loads(p.read_text())


def _normalized_config(cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if k in CONFIG_KEYS_IGNORED:
            continue
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            v = sorted(v)
        if k == "base_model_name_or_path" and isinstance(v, str) and os.path.exists(v):
            v = os.path.realpath(v)
        out[k] = v
    return out


def check_adapters_compatible(adapter_dirs: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Refuse adapters that a plain mean would silently corrupt; return fold 0's config.

    Checks, with a message naming the folds and the differing keys: the same adapter_config.json
    (rank ``r``, ``lora_alpha``, target modules, ``modules_to_save``, base model, task type ...),
    the same init seed where a ``lora_init.json`` records it, and the same tensor names/shapes.
    The init seed is also checked from the weights themselves (see :data:`MIN_A_COSINE`) by
    :func:`check_same_init`, since adapter_config.json does not record it.
    """
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise ValueError("average_adapters needs at least one adapter directory")
    configs = [_normalized_config(read_adapter_config(d)) for d in dirs]
    ref = configs[0]
    for d, c in zip(dirs[1:], configs[1:]):
        keys = sorted(k for k in set(ref) | set(c) if ref.get(k) != c.get(k))
        if keys:
            detail = "; ".join(f"{k}: {ref.get(k)!r} vs {c.get(k)!r}" for k in keys)
            raise AdapterMismatchError(
                f"cannot average adapters with different configs: {dirs[0]} and {d} differ in "
                f"adapter_config.json ({detail}). Every fold must be trained with the same LoRA "
                "settings (rank, alpha, target modules, init seed) on the same base."
            )
    seeds = {}
    for d in dirs:
        p = d / LORA_INIT_FILE
        if p.exists():
            seeds[str(d)] = json.loads(p.read_text()).get("init_seed")
    if len(set(seeds.values())) > 1:
        raise AdapterMismatchError(
            f"cannot average adapters trained from different LoRA init seeds: {seeds}. "
            "Set the same lora.init_seed for every fold."
        )
    return read_adapter_config(dirs[0])


def check_same_init(tensors: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """Median cosine of each fold's LoRA ``A`` matrices with fold 0's; refuse when below
    :data:`MIN_A_COSINE` (different init seeds make the plain mean of A and B meaningless)."""
    import torch

    ref = tensors[0]
    a_keys = [k for k in ref if "lora_A" in k]
    out: dict[str, float] = {}
    for name, t in zip(names[1:], tensors[1:]):
        if not a_keys:
            break
        cos = [
            float(
                torch.nn.functional.cosine_similarity(
                    ref[k].float().flatten(), t[k].float().flatten(), dim=0
                )
            )
            for k in a_keys
        ]
        med = statistics.median(cos)
        out[name] = med
        if med < MIN_A_COSINE:
            raise AdapterMismatchError(
                f"cannot average adapters from different LoRA init seeds: the lora_A matrices of "
                f"{name} and {names[0]} have median cosine similarity {med:.3f} (< {MIN_A_COSINE}). "
                "Same-seed folds start identical; set the same lora.init_seed for every fold, or "
                "use average.method=mean_deltas, which does not need it."
            )
    return out


def _check_same_tensors(tensors: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    ref = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if set(t) != set(ref):
            diff = sorted(set(t) ^ set(ref))[:5]
            raise AdapterMismatchError(
                f"{name} and {names[0]} hold different tensors (e.g. {diff})"
            )
        bad = [k for k in ref if tuple(ref[k].shape) != tuple(t[k].shape)]
        if bad:
            raise AdapterMismatchError(
                f"{name} and {names[0]} have different shapes for {bad[:3]} "
                f"({tuple(t[bad[0]].shape)} vs {tuple(ref[bad[0]].shape)}): different ranks?"
            )


def _copy_side_files(src: Path, dst: Path, skip: set[str]) -> list[str]:
    """Copy the tokenizer and format files (everything but the weights/config) next to a model."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.name in skip or f.name.startswith("."):
            continue
        if f.is_file():
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def _file_digest(p: Path) -> str | None:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.exists() else None


# --------------------------------------------------------------------------------------------
# Loading the base
# --------------------------------------------------------------------------------------------
BASE_POINTER = "arena_base.json"
"""A base directory that only points at a real checkpoint (gpu/models.py writes it)."""
SPEC_FILE = "arena_spec.json"


def _read_spec(directory: Path) -> Any:
    from arena_assets.core.settings import ModelSpec

    f = directory / SPEC_FILE
    return ModelSpec.model_validate_json(f.read_text()) if f.exists() else None


def _load_base(path: str | os.PathLike[str]):
    """The base sequence classifier for merging: UNQUANTIZED (a QLoRA spec's 4/8-bit base would
    make the merge lossy), in the spec's dtype (else the saved one), on this process's device
    (``models.device()``: its GPU, else the CPU: a 9B merge and its probe forward on a GPU node's
    CPU took minutes), eager attention for Gemma-2 (sdpa drops its softcapping; the merge does
    not care, the probe forward does). A pointer directory (``arena_base.json``) is followed to
    the real checkpoint."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from arena_assets.gpu.models import device

    p = Path(path)
    spec = _read_spec(p)
    if (p / BASE_POINTER).exists():
        p = Path(json.loads((p / BASE_POINTER).read_text())["path"])
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    kwargs: dict[str, Any] = {
        "dtype": spec.dtype if spec is not None else "auto",
        "local_files_only": True,
    }
    if str(getattr(config, "model_type", "")).startswith("gemma"):
        kwargs["attn_implementation"] = "eager"
    model = AutoModelForSequenceClassification.from_pretrained(p, **kwargs).to(device())
    model.eval()
    return model


def write_plain_spec(src: Path, dst: Path) -> None:
    """Copy ``arena_spec.json`` with ``quantize_base="none"``: a merged (or quantized) model is
    loaded as saved, never re-quantized through the training spec's QLoRA setting."""
    spec = _read_spec(src)
    if spec is not None:
        spec = spec.model_copy(update={"quantize_base": "none"})
        (dst / SPEC_FILE).write_text(spec.model_dump_json(indent=2) + "\n")


def _probe_inputs(model, n: int = 2, length: int = 16, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(low=min(5, vocab - 1), high=vocab, size=(n, length), generator=g)
    ids = ids.to(next(model.parameters()).device)  # the model's device (``_load_base``)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model, inputs) -> Any:
    import torch

    with torch.no_grad():
        return model(**inputs).logits.float()


# --------------------------------------------------------------------------------------------
# Step 6a: average
# --------------------------------------------------------------------------------------------
def average_adapters(
    adapter_dirs: Sequence[str | os.PathLike[str]],
    cfg: AverageSettings,
    *,
    out_dir: str | os.PathLike[str],
) -> StepResult:
    """Average the fold adapters. ``mean_adapters`` → ``adapter/`` (paths key ``adapter``);
    ``mean_deltas`` → ``model/`` (a full merged model, paths key ``model``).

    Refuses (``AdapterMismatchError``) adapters with different configs, ranks, bases or init
    seeds. Writes the tokenizer files of fold 0 next to the result.
    """
    dirs = [Path(d) for d in adapter_dirs]
    names = [str(d) for d in dirs]
    check_adapters_compatible(dirs)
    with step_output(out_dir, "average") as (tmp, result):
        result.info.update({"method": cfg.method, "n_adapters": len(dirs), "adapter_dirs": names})
        tok_digests = {_file_digest(d / "tokenizer.json") for d in dirs}
        if len(tok_digests) > 1:
            result.notes.append(
                "fold adapters carry different tokenizer.json files; fold 0's is used"
            )
        if cfg.method == "mean_adapters":
            _mean_adapters(dirs, names, tmp, result)
        elif cfg.method == "mean_deltas":
            _mean_deltas(dirs, tmp, result)
        else:  # pragma: no cover - pydantic already restricts it
            raise ValueError(f"unknown average method {cfg.method!r}")
    return result


def _mean_adapters(dirs: list[Path], names: list[str], tmp: Path, result: StepResult) -> None:
    import torch
    from safetensors.torch import save_file

    t0 = time.time()
    tensors = [_load_adapter_tensors(d) for d in tqdm(dirs, desc="load adapters", leave=False)]
    _check_same_tensors(tensors, names)
    cos = check_same_init(tensors, names)
    mean: dict[str, torch.Tensor] = {}
    for k, ref in tensors[0].items():
        stacked = torch.stack([t[k].to(torch.float32) for t in tensors])
        mean[k] = stacked.mean(dim=0).to(ref.dtype).contiguous()
    out = tmp / "adapter"
    out.mkdir()
    save_file(mean, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(dirs[0] / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    copied = _copy_side_files(dirs[0], out, skip={*ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md"})
    n_params = sum(int(v.numel()) for v in mean.values())
    log.info(
        "averaged %d adapters (%d tensors, %d values) into %s", len(dirs), len(mean), n_params, out
    )
    result.paths["adapter"] = "adapter"
    result.metrics.update(
        {"n_adapters": float(len(dirs)), "n_tensors": float(len(mean)), "n_values": float(n_params)}
    )
    if cos:
        result.metrics["min_lora_A_cosine"] = float(min(cos.values()))
    result.info["lora_A_cosine_to_fold0"] = cos
    result.info["copied_files"] = copied
    result.timings["average_s"] = round(time.time() - t0, 3)


def _mean_deltas(dirs: list[Path], tmp: Path, result: StepResult) -> None:
    """Exact mean of the merged weight deltas: load every fold adapter onto one base under its
    own name, take peft's ``get_delta_weight`` per LoRA layer, average, add to the base."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    t0 = time.time()
    acfg = read_adapter_config(dirs[0])
    if acfg.get("use_dora"):
        raise AdapterMismatchError(
            "mean_deltas does not support DoRA adapters (not a linear delta); "
            "use average.method=mean_adapters"
        )
    base_path = acfg["base_model_name_or_path"]
    base = _load_base(base_path)
    names = [f"fold{i}" for i in range(len(dirs))]
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=names[0])
    for name, d in tqdm(list(zip(names[1:], dirs[1:])), desc="load adapters", leave=False):
        model.load_adapter(str(d), adapter_name=name)
    model.eval()

    prefix = "base_model.model."
    deltas: dict[str, torch.Tensor] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            short = mod_name.removeprefix(prefix)
            if isinstance(mod, LoraLayer):
                acc = None
                for n in names:
                    dw = mod.get_delta_weight(n).to(torch.float32)
                    acc = dw if acc is None else acc + dw
                deltas[short] = acc / len(names)
            elif isinstance(mod, ModulesToSaveWrapper):
                params = [dict(mod.modules_to_save[n].named_parameters()) for n in names]
                heads[short] = {
                    p: torch.stack([ps[p].detach().to(torch.float32) for ps in params]).mean(0)
                    for p in params[0]
                }
    merged = model.unload()  # the base, every adapter removed, original modules restored
    mods = dict(merged.named_modules())
    with torch.no_grad():
        for short, dw in deltas.items():
            w = mods[short].weight
            w.copy_((w.to(torch.float32) + dw).to(w.dtype))
        for short, ps in heads.items():
            for pname, val in ps.items():
                p = mods[short].get_parameter(pname)
                p.copy_(val.to(p.dtype))
    out = tmp / "model"
    merged.save_pretrained(out)
    copied = _copy_side_files(dirs[0], out, skip={*ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md"})
    write_plain_spec(dirs[0], out)
    log.info(
        "mean of %d folds' weight deltas (%d LoRA layers, %d heads) into %s",
        len(dirs),
        len(deltas),
        len(heads),
        out,
    )
    result.paths["model"] = "model"
    result.metrics.update(
        {
            "n_adapters": float(len(dirs)),
            "n_lora_layers": float(len(deltas)),
            "n_heads": float(len(heads)),
        }
    )
    result.info.update({"base_model": str(base_path), "copied_files": copied,
                        "devices": sorted({str(q.device) for q in merged.parameters()})})
    result.timings["average_s"] = round(time.time() - t0, 3)


# --------------------------------------------------------------------------------------------
# Step 6b: merge + merged temperature
# --------------------------------------------------------------------------------------------
def merged_temperature(
    temperatures: Sequence[float], cfg: CalibrationSettings
) -> tuple[float, str]:
    """The merged model's temperature and the rule that gave it (documented default: the mean
    of the fold temperatures)."""
    temps = [float(t) for t in temperatures]
    if not cfg.enabled:
        return 1.0, "disabled"
    if cfg.merged_temperature == "none" or not temps:
        return 1.0, "none"
    if cfg.merged_temperature == "median":
        return float(statistics.median(temps)), "median"
    return float(statistics.fmean(temps)), "mean"


def _read_temperature(t: float | str | os.PathLike[str]) -> float:
    if isinstance(t, (int, float)):
        return float(t)
    p = Path(t)
    if p.is_dir():
        p = p / "calibration.json"
    return float(json.loads(p.read_text())["temperature"])


def merge_adapter(
    adapter_dir: str | os.PathLike[str],
    temperatures: Sequence[float | str | os.PathLike[str]],
    cfg: CalibrationSettings,
    *,
    out_dir: str | os.PathLike[str],
) -> StepResult:
    """Merge an adapter into its base (``merge_and_unload``) → ``model/`` + tokenizer, and write
    ``calibration.json`` {temperature, fold_temperatures, rule}.

    ``temperatures``: the fold temperatures as floats, or paths to the folds' calibration.json
    (or their directories). ``adapter_dir`` may also be a full model (the ``mean_deltas`` output):
    it is then copied through unchanged. The max |logit| difference between the unmerged and
    merged model on a random probe batch is recorded as ``merge_max_abs_diff``.
    """
    import torch
    from peft import PeftModel

    src = Path(adapter_dir)
    fold_temps = [_read_temperature(t) for t in temperatures]
    temp, rule = merged_temperature(fold_temps, cfg)
    with step_output(out_dir, "merge") as (tmp, result):
        t0 = time.time()
        out = tmp / "model"
        if (src / ADAPTER_CONFIG).exists():
            acfg = read_adapter_config(src)
            base = _load_base(acfg["base_model_name_or_path"])
            model = PeftModel.from_pretrained(base, str(src))
            model.eval()
            probe = _probe_inputs(model)
            before = _logits(model, probe)
            merged = model.merge_and_unload()
            merged.eval()
            after = _logits(merged, probe)
            diff = float((before - after).abs().max())
            merged.save_pretrained(out)
            _copy_side_files(src, out, skip={*ADAPTER_WEIGHTS, ADAPTER_CONFIG, "README.md"})
            write_plain_spec(src, out)
            result.metrics["merge_max_abs_diff"] = diff
            result.info.update(
                {
                    "source": "adapter",
                    "base_model": acfg["base_model_name_or_path"],
                    "dtype": str(next(merged.parameters()).dtype),
                    "devices": sorted({str(q.device) for q in merged.parameters()}),
                }
            )
            log.info("merged %s into its base (max |logit diff| on a probe %.2e)", src, diff)
            del model, merged, base
            if torch.cuda.is_available():  # pragma: no cover - GPU only
                torch.cuda.empty_cache()
        else:
            if not (src / "config.json").exists():
                raise FileNotFoundError(f"{src}: neither a peft adapter nor a full model directory")
            shutil.copytree(src, out)
            result.info["source"] = "full model (already merged, e.g. mean_deltas): copied"
            result.notes.append("input was already a full model; copied without merging")
        calib = {"temperature": temp, "fold_temperatures": fold_temps, "rule": rule}
        (tmp / "calibration.json").write_text(json.dumps(calib, indent=2) + "\n")
        result.paths.update({"model": "model", "calibration": "calibration.json"})
        result.metrics["temperature"] = temp
        result.info["temperature_rule"] = rule
        result.timings["merge_s"] = round(time.time() - t0, 3)
    return result
