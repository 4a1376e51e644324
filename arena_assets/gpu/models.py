"""Models: a real checkpoint by path, or a tiny Gemma-2/Llama built from a config; fully offline.

Why these rules:

* **Never a silent downgrade.** The seed scripts swapped in a smaller model when the requested one
  was missing (AUTO_DOWNGRADE), which silently changes every result. Here a missing checkpoint is
  an error; a fallback happens only with ``spec.allow_downgrade`` and is recorded.
* **Gemma-2 softcapping.** transformers' sdpa path silently drops ``attn_logit_softcapping``;
  eager and flex_attention apply it. The choice is logged and recorded with the model.
* **Offline.** Nothing is downloaded: paths must exist, ``local_files_only=True``; tiny tokenizers
  are trained from the data with ``tokenizers`` (word level, on span-tagged text).
* **Provenance.** :func:`model_record` notes path, config hash and commit (a git checkout or a HF
  cache snapshot) of whatever was loaded; steps put it in ``result.info``.

Directory kinds :func:`load_classifier` understands: a base dir (``save_pretrained`` of a 3-label
sequence classifier + tokenizer), a pointer dir (``arena_base.json`` naming an untouched real
checkpoint, plus its tokenizer), a peft adapter dir (``adapter_config.json``), and a quantized dir
(``from_pretrained`` reads its ``quantization_config``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from arena_assets.gpu.formatting import TINY_SPECIAL_TOKENS, TextFormat, load_format, save_format

log = logging.getLogger(__name__)

BASE_POINTER = "arena_base.json"
SPEC_FILE = "arena_spec.json"
"""The ``ModelSpec`` a model dir was made from (dtype, attention, QLoRA): how to load it again."""
NUM_LABELS = 3
ID2LABEL = {0: "winner_model_a", 1: "winner_model_b", 2: "winner_tie"}
HEAD_INIT_SEED = 1234
"""Seed of weights a checkpoint lacks when the caller names none (``LoraSettings.init_seed``'s default)."""


# ------------------------------------------------------------------------------ threads/seeds
def cpu_threads() -> int:
    """Threads for CPU torch: ``$ARENA_TORCH_THREADS``, else Slurm's cpus per task, else the
    CPUs this process may run on (taskset/cgroup affinity) minus one left to the orchestrator
    (Dagster webserver/daemon, the test runner), at least 1, at most 8.

    Why not all cores: measured on a busy 2-core box, a tiny model's post-pretraining took 160 s
    with 2 threads and 31 s with 1 (OpenMP threads spin-wait when a core is taken). On 2 quiet
    cores 2 threads are 1.5x faster (0.074 vs 0.114 s per training step): set
    ``ARENA_TORCH_THREADS=2`` where nothing else runs."""
    for var in ("ARENA_TORCH_THREADS", "SLURM_CPUS_PER_TASK"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n - 1, 8))


def data_parallel_rank() -> int:
    """This process's rank in data-parallel training (torch.distributed's ``RANK``, exported by
    torchrun or by the Slurm backend's ``DistributedStep``); 0 when not distributed. Rank 0
    alone writes a step's artifact."""
    return int(os.environ.get("RANK", "0"))


def setup_torch(seed: int | None = None) -> None:
    """CPU threads (:func:`cpu_threads`) and seeds everywhere (python, numpy, torch)."""
    import torch

    if not torch.cuda.is_available():
        n = cpu_threads()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``, exported by torchrun or by the Slurm
    backend's ``DistributedStep``); 0 when not distributed."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def cuda_index(rank: int, n_devices: int) -> int:
    """The GPU index a rank uses among the ``n_devices`` it sees: ``rank % n_devices``.

    Why this rule: it is the one accelerate applies to the Trainer's device
    (``PartialState.set_device``), so weights placed by ``from_pretrained(device_map=...)`` sit on
    the GPU the Trainer's DDP expects. The modulo covers a Slurm task that sees only its own GPU
    (``DistributedStep`` sets ``CUDA_VISIBLE_DEVICES`` to the local rank's GPU): index 0."""
    if n_devices < 1:
        raise ValueError("no CUDA device to choose from")
    return rank % n_devices


def placement(n_cuda: int, rank: int) -> str:
    """Where this process's model lives: ``cuda:<cuda_index>`` when it sees GPUs, else ``cpu``.

    One GPU per process: several GPUs are used by several ranks (training) or several shard
    processes (TTA), never by one process (no ``nn.DataParallel``)."""
    return f"cuda:{cuda_index(rank, n_cuda)}" if n_cuda > 0 else "cpu"


def placement_kwargs(quantized: bool, n_cuda: int, rank: int) -> dict[str, Any]:
    """``from_pretrained`` kwargs that put a quantized (GPTQ or bitsandbytes) model on this
    process's device; {} for a plain model (moved with ``.to(device())`` after loading).

    Why: a quantized model cannot be moved with ``.to`` (bitsandbytes) or stays where its
    kernels were set up (GPTQ), so it must be loaded where it will run. Without a device map the
    GPTQ model loaded on the CPU (TTA on the CPU of a GPU node), and every data-parallel rank's
    4-bit base landed on GPU 0."""
    return {"device_map": {"": cuda_index(rank, n_cuda) if n_cuda > 0 else "cpu"}} if quantized else {}


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device() -> Any:
    """This process's device (:func:`placement` of the visible GPUs and ``LOCAL_RANK``)."""
    import torch

    return torch.device(placement(cuda_count(), local_rank()))


def model_devices(model: Any) -> list[str]:
    """The devices holding ``model``'s parameters (``["cuda:0"]``, ``["cpu"]``): what a step
    records in ``result.json`` (``info["devices"]``) so a CPU fallback cannot pass unnoticed."""
    return sorted({str(p.device) for p in model.parameters()})


def is_quantized(model: Any) -> bool:
    """A GPTQ or bitsandbytes model (transformers sets ``hf_quantizer``; bitsandbytes also the
    ``is_loaded_in_*bit`` flags). Such a model is placed by ``from_pretrained`` (never moved with
    ``.to``), gets no FP8 swap, and its layers are never compiled for TTA: GPTQModel's Triton
    kernels autotune inside ``torch.compile``, and on the H200 the GPTQ TTA had not finished
    compiling after minutes where the bf16 model compiled in seconds (issue 15)."""
    return getattr(model, "hf_quantizer", None) is not None or bool(
        getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


# ------------------------------------------------------------------------------ tokenizer
def train_word_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int = 2048) -> Any:
    """A word-level tokenizer trained on formatted (span-tagged) text; split on whitespace only,
    so a tag like ``a|good`` stays one token. Special tokens: [PAD] [UNK] [BOS] [EOS] [P] [A] [B]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        padding_side="right",
        model_max_length=model_max_length,
    )


# ------------------------------------------------------------------------------ tiny models
def build_tiny(cfg: Any, tokenizer: Any, attn_implementation: str = "eager", dtype: str | None = None) -> Any:
    """A random-init 3-label sequence classifier (Gemma-2 or Llama) sized by ``TinyModelConfig``,
    built in ``dtype`` (``ModelSpec.dtype``; None: float32) on this process's device.

    Why build where it runs: a "tiny" config at a real width (the GPU end-to-end run: Llama-3-70B
    width, Gemma-2-9B width) was initialised in float32 on the CPU and saved as float32 — 7 GB and
    tens of seconds for two 70B-width layers before a 4-bit load threw most of it away."""
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=NUM_LABELS,
        id2label=ID2LABEL,
        label2id={v: k for k, v in ID2LABEL.items()},
    )
    torch.manual_seed(cfg.seed)
    if cfg.arch == "gemma2":
        config = Gemma2Config(**common, sliding_window=max(cfg.max_position_embeddings, 4096))
        cls = Gemma2ForSequenceClassification
    elif cfg.arch == "llama":
        config = LlamaConfig(**common)
        cls = LlamaForSequenceClassification
    else:  # pragma: no cover - pydantic restricts it
        raise ValueError(f"unknown tiny arch {cfg.arch!r}")
    attention_choice(config.model_type, attn_implementation, config)
    _register_if_ours(attn_implementation)
    config._attn_implementation = attn_implementation
    with torch.device(device()):
        return cls._from_config(config, dtype=_dtype(dtype) or torch.float32)


# ------------------------------------------------------------------------------ attention
def _register_if_ours(impl: str | None) -> None:
    """``arena_flex`` is registered with transformers on first use (gpu/packing.py)."""
    if impl == "arena_flex":
        from arena_assets.gpu.packing import register_attention

        register_attention()


def attention_choice(model_type: str, impl: str | None, config: Any = None) -> dict[str, Any]:
    """Record what the attention implementation does to Gemma-2 softcapping (warn on sdpa)."""
    rec: dict[str, Any] = {"attn_implementation": impl or "default"}
    if model_type == "gemma2":
        cap = getattr(config, "attn_logit_softcapping", 50.0) if config is not None else 50.0
        applied = impl in ("eager", "flex_attention", "arena_flex") or cap is None
        rec["softcapping_applied"] = bool(applied)
        if not applied:
            msg = (
                f"Gemma-2 with attn_implementation={impl!r} DROPS attention softcapping "
                f"(attn_logit_softcapping={cap}); use 'eager' or 'flex_attention' to apply it. "
                "Recorded as softcapping_applied=false."
            )
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
    return rec


# ------------------------------------------------------------------------------ provenance
def model_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Path, config hash and commit (git checkout or HF snapshot id) of a model directory."""
    p = Path(path).resolve()
    rec: dict[str, Any] = {"path": str(p)}
    cfg = p / "config.json"
    if not cfg.exists() and (p / "adapter_config.json").exists():
        cfg = p / "adapter_config.json"
    if cfg.exists():
        rec["config_hash"] = hashlib.sha256(cfg.read_bytes()).hexdigest()[:16]
    commit = None
    if (p / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(p), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = None
    elif p.parent.name == "snapshots":
        commit = p.name
    if commit:
        rec["commit"] = commit
    return rec


def resolve_checkpoint(spec: Any) -> tuple[Path, dict[str, Any]]:
    """The checkpoint path to load for a real spec; refuses a missing one unless downgrade is allowed."""
    want = Path(os.path.expanduser(spec.path))
    if want.is_dir():
        return want, {}
    if spec.allow_downgrade and spec.downgrade_path and Path(spec.downgrade_path).is_dir():
        log.warning("model %s not found: DOWNGRADING to %s (allow_downgrade is set)", want, spec.downgrade_path)
        return Path(spec.downgrade_path), {"downgraded_from": str(want), "downgraded_to": spec.downgrade_path}
    hint = (
        "set allow_downgrade=true and downgrade_path to accept a smaller model (it will be recorded)"
        if not spec.allow_downgrade
        else f"downgrade_path {spec.downgrade_path!r} does not exist either"
    )
    raise FileNotFoundError(
        f"model checkpoint {want} does not exist; refusing to substitute another model silently ({hint})"
    )


def _dtype(name: str | None) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name or "", None)


def _bnb_config(spec: Any) -> Any:
    if spec is None or spec.quantize_base == "none":
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantize_base == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_dtype(spec.dtype),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _ensure_pad(model: Any, tokenizer: Any) -> None:
    """Real causal checkpoints often lack a pad token: use EOS (recorded by the caller)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.model_max_length is None or tok.model_max_length > 10**6:
        tok.model_max_length = 8192
    return tok


def load_pretrained(
    path: str | Path,
    spec: Any = None,
    tokenizer_path: str | Path | None = None,
    record: dict[str, Any] | None = None,
    init_seed: int = HEAD_INIT_SEED,
) -> tuple[Any, Any]:
    """A 3-label sequence classifier from a full checkpoint dir (base, merged or quantized).

    A quantized model is loaded onto this process's device (:func:`placement_kwargs`); weights
    the checkpoint lacks are initialised under ``init_seed`` (:func:`_seeded`)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    impl = spec.attn_implementation if spec is not None else ("eager" if config.model_type == "gemma2" else None)
    kwargs: dict[str, Any] = {"num_labels": NUM_LABELS, "local_files_only": True}
    if impl:
        _register_if_ours(impl)
        kwargs["attn_implementation"] = impl
    if spec is not None and _dtype(spec.dtype) is not None:
        kwargs["dtype"] = _dtype(spec.dtype)
    q = _bnb_config(spec)
    if q is not None:
        kwargs["quantization_config"] = q
    # bitsandbytes now, or a GPTQ/bnb checkpoint (its config.json holds a quantization_config)
    quantized = q is not None or getattr(config, "quantization_config", None) is not None
    kwargs.update(placement_kwargs(quantized, cuda_count(), local_rank()))
    with _seeded(init_seed):  # weights the checkpoint lacks (a real base's new `score` head)
        model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
    if model.config.num_labels != NUM_LABELS:
        raise ValueError(f"{path} has num_labels={model.config.num_labels}, expected {NUM_LABELS}")
    tok = _load_tokenizer(tokenizer_path or path)
    _ensure_pad(model, tok)
    tok.arena_format = load_format(tokenizer_path or path)
    rec = record if record is not None else {}
    rec.update(model_record(path))
    rec.update(attention_choice(config.model_type, impl, config))
    if q is not None:
        rec["quantize_base"] = spec.quantize_base
    model.arena_record = rec
    return model, tok


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)`` and restore every RNG afterwards.

    Why: loading a real checkpoint (no post-pretraining) as a 3-label classifier creates the
    ``score`` head at random from whatever state the global RNG happened to be in, so the folds'
    heads differed and plain averaging of the fold models mixed unrelated heads. Seeded, every
    fold starts from the same head; restoring the RNG leaves everything after the load as it was."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # only this process's GPU: forking every visible GPU's RNG would open a context on each
    with torch.random.fork_rng(devices=[cuda_index(local_rank(), n)] if n else []):
        torch.manual_seed(seed)
        yield


def load_classifier(path: str | os.PathLike[str], spec: Any = None, init_seed: int = HEAD_INIT_SEED) -> tuple[Any, Any]:
    """Load a base, pointer, adapter, merged or quantized directory for training or inference.

    Returns ``(model, tokenizer)``; ``tokenizer.arena_format`` is the saved :class:`TextFormat`
    and ``model.arena_record`` says what was loaded (path, config hash, commit, attention).
    ``init_seed`` seeds weights the checkpoint lacks (training passes ``LoraSettings.init_seed``).
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model directory {p} does not exist")
    if spec is None:
        spec = read_spec(p)
    if (p / "adapter_config.json").exists():
        from peft import PeftModel

        base_path = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        base, _ = load_classifier(base_path, spec, init_seed)
        model = PeftModel.from_pretrained(base, str(p))
        tok = _load_tokenizer(p)
        _ensure_pad(base, tok)
        tok.arena_format = load_format(p)
        model.arena_record = {**getattr(base, "arena_record", {}), "adapter": model_record(p)}
        return model, tok
    if (p / BASE_POINTER).exists():
        ptr = json.loads((p / BASE_POINTER).read_text())
        return load_pretrained(ptr["path"], spec, tokenizer_path=p, record={"pointer": str(p)}, init_seed=init_seed)
    return load_pretrained(p, spec, init_seed=init_seed)


def read_spec(directory: str | os.PathLike[str]) -> Any:
    """The ``ModelSpec`` saved in a model dir, or None."""
    from arena_assets.core.settings import ModelSpec

    f = Path(directory) / SPEC_FILE
    return ModelSpec.model_validate_json(f.read_text()) if f.exists() else None


def write_spec(spec: Any, directory: str | os.PathLike[str]) -> None:
    if spec is not None:
        (Path(directory) / SPEC_FILE).write_text(spec.model_dump_json(indent=2) + "\n")


def save_classifier(model: Any, tokenizer: Any, tf: TextFormat, directory: str | Path) -> Path:
    """``save_pretrained`` of model (full or adapter) + tokenizer + ``arena_format.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    save_format(tf, d)
    return d


def param_count(model: Any) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": int(total), "trainable_params": int(train)}
