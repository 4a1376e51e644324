"""Typed settings for the whole recipe: one file, plain objects, per-step hashes.

Why plain pydantic models in ``core/`` and not Dagster ``Config`` classes: the same objects are
pickled into Slurm jobs, Kubernetes pods and the separate GPTQ environment, none of which has
Dagster installed. The defaults run the embedded demo (tiny models, CPU, minutes); the 1st-place
values for real checkpoints are documented next to each field and collected in
``settings/first_place.example.yaml``.

Staleness: each asset's Dagster ``code_version`` is :func:`settings_hash` of the step settings
object it uses (see :meth:`Settings.for_step`), so changing ``student.kd.alpha`` marks exactly the
student's assets and their dependents stale, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SETTINGS_ENV = "ARENA_SETTINGS"
"""Environment variable naming the settings file (YAML or TOML)."""

STEP_VERSION = "1"
"""Bumped when a step's code changes in a way that invalidates its artifacts."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class TinyModelConfig(_Frozen):
    """A small random-init model built from a config (tests, the demo). Never downloaded."""

    arch: Literal["gemma2", "llama"] = "gemma2"
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    vocab_size: int = 6000
    """Upper bound for the word-level tokenizer trained from the data."""
    max_position_embeddings: int = 2048
    seed: int = 0


class ModelSpec(_Frozen):
    """Where a model family's weights come from.

    ``path`` set: a real checkpoint loaded by path (``tokenizer_path`` may differ, as in the
    seed scripts). ``path`` empty: a tiny model built from ``tiny`` with a tokenizer trained on
    the data, fully offline.
    """

    path: str | None = None
    tokenizer_path: str | None = None
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "flex_attention", "arena_flex", "sdpa", "flash_attention_2"] = "eager"
    """Gemma-2 applies attention softcapping only with eager, flex_attention or arena_flex; sdpa
    silently drops it. The default is eager (CPU); on GPUs ``arena_flex`` (gpu/packing.py:
    flex_attention compiled once, softcap as score_mod; what the packed paths need)."""
    quantize_base: Literal["none", "4bit", "8bit"] = "none"
    """QLoRA: load the base through bitsandbytes (CUDA)."""
    allow_downgrade: bool = False
    """Never swap in a smaller model silently; a fallback checkpoint is used only when set."""
    downgrade_path: str | None = None
    span_tags: bool | None = None
    """Span identity for the cross-encoder: tag every word with its span (prompt/A/B) so a
    random-init model can tell A's tokens from B's. None = on for tiny models, off for real
    checkpoints (whose format marks spans with headers)."""

    @property
    def is_tiny(self) -> bool:
        return not self.path


class LoraSettings(_Frozen):
    """LoRA (peft). 1st place: r=64, alpha=128, all linear layers."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    init_seed: int = 1234
    """The SAME adapter init in every fold: plain averaging of adapters needs it."""


class TrainSettings(_Frozen):
    """Hyper-parameters handed to the transformers Trainer."""

    learning_rate: float = 2e-3
    """1st place student: 5e-5 (cosine, 100 warm-up steps)."""
    lr_scheduler: str = "cosine"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    num_epochs: float = 1.0
    max_steps: int = -1
    per_device_batch_size: int = 16
    grad_accum: int = 1
    """1st place: global batch 64."""
    max_length: int = 192
    """Training max length (1st place teachers: 1024). The demo's rows are about 130 tokens."""
    label_smoothing: float = 0.0
    group_by_length: bool = True
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 50
    eval_steps: int = 50
    """Evaluate on the validation fold every N steps (loss curves in history.json); 0 = only once
    at the end."""
    logging_steps: int = 5
    dataloader_workers: int = 0
    packing: bool = False
    """One packed slab per batch instead of padded rows (gpu/packing.py): no compute on pad
    tokens; with ``arena_flex`` attention no L x L scores either. Same loss as padding."""
    packing_slab_tokens: int | None = None
    """Fixed slab length (one shape for torch.compile; must hold a whole batch); None = the
    batch's tokens rounded up to 128."""
    compile: bool = False
    """CUDA: ``torch.compile`` each decoder layer (gpu/fast.compile_layers, static shapes). With
    packing + arena_flex it took the 9B student's LoRA step from 0.36 to 0.56 of the H100's bf16
    ceiling (docs/gpu.md); every new slab length compiles once, so pair it with
    ``packing_slab_tokens`` when rows have one length, or expect a compile per length bucket."""


class FormatSettings(_Frozen):
    """How a row becomes a model input (see gpu/formatting.py)."""

    max_length: int = 192
    """Default length where a step has no own max length (training uses ``TrainSettings.max_length``,
    inference ``InferSettings.max_length``)."""
    prompt_max_tokens: int = 48
    """1st place: the prompt capped at 256 tokens, the longer response trimmed first."""


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
class PostPretrainSettings(_Frozen):
    """Step 1: train a family's base on external preference pairs, merge, save_pretrained."""

    enabled: bool = True
    """False passes the base through unchanged."""
    train: TrainSettings = TrainSettings(
        learning_rate=1.5e-3, per_device_batch_size=16, num_epochs=2.0, lr_scheduler="linear", warmup_steps=10,
        logging_steps=10, eval_steps=100,
    )
    """Demo: 2 epochs over the external pairs with linear decay to 0 (learnability recipe: span
    tags + LR decay; more epochs overfit). Measured on the default sample (held-out external
    log-loss): lr 1.5e-3 gave 0.70 (gemma) / 0.71 (llama), 3e-3 gave 0.77 / 0.91, 6e-3 llama 1.01.
    1st place: one epoch at lr 1e-5 on about 157k pairs."""
    lora: LoraSettings = LoraSettings(enabled=False)
    """Tiny bases are fully trained (LoRA on a random-init base barely learns); real bases use
    LoRA/QLoRA and are merged."""
    max_rows: int | None = None


class TeacherSettings(_Frozen):
    """Step 3: one teacher per fold and family (sequence classifier + LoRA)."""

    train: TrainSettings = TrainSettings(learning_rate=1e-3, warmup_steps=10)
    """LoRA on a trained tiny base wants about 1e-3 with decay (learnability recipe)."""
    lora: LoraSettings = LoraSettings()
    use_external: bool = False
    """Add external pairs to each fold's teacher training (1st place: 33k rows; true in
    settings/first_place.example.yaml). Off in the demo: half of the bundled external pairs are
    UltraFeedback-style, which never ties, so teachers trained on them under-predict ties and
    distilling them made the KD student worse than the CE-only one (docs/fidelity.md)."""
    max_external_rows: int | None = 500
    """Demo budget; 1st place: about 33k external rows per teacher (None = all)."""


class KDSettings(_Frozen):
    """Step 5 loss: alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*CE_ls + mse*MSE + cos*(1-cos)."""

    alpha: float = 0.5
    temperature: float = 2.0
    mse_weight: float = 0.0
    cos_weight: float = 0.0
    label_smoothing: float = 0.05
    teacher_families: list[str] | None = None
    """None = every teacher family, averaged (1st place: qwen + llama)."""


class StudentSettings(_Frozen):
    train: TrainSettings = TrainSettings(learning_rate=1e-3, warmup_steps=10)
    """1st place: lr 5e-5 cosine, 100 warm-up steps, global batch 64, bf16."""
    lora: LoraSettings = LoraSettings()
    kd: KDSettings = KDSettings()


class CalibrationSettings(_Frozen):
    """Per-fold temperature scaling fitted with LBFGS on the fold's validation logits."""

    enabled: bool = True
    max_iter: int = 100
    merged_temperature: Literal["mean", "median", "none"] = "mean"
    """Temperature of the averaged-and-merged model: the mean of the fold temperatures."""


class AverageSettings(_Frozen):
    """Step 6: average fold adapters and heads, then merge."""

    method: Literal["mean_adapters", "mean_deltas"] = "mean_adapters"
    """mean_adapters: plain mean of LoRA A/B tensors and heads (the seed's way);
    mean_deltas: exact mean of the weight deltas B@A."""


class QuantSettings(_Frozen):
    """Step 7: 8-bit quantization, GPTQ first, bitsandbytes int8 as the recorded fallback."""

    methods: list[Literal["gptq", "bnb8", "none"]] = ["gptq", "bnb8", "none"]
    bits: int = 8
    group_size: int = 128
    n_calibration: int = 32
    """1st place: 128 calibration texts (settings/first_place.example.yaml)."""
    calibration_max_length: int = 256
    """1st place: seqlen 2100."""
    python: str | None = None
    """Interpreter of the GPTQ environment (GPTQModel pins protobuf>=7, Dagster <7).
    None: ``$ARENA_QUANT_PYTHON`` or ``.venv-quant/bin/python`` when present."""


class InferSettings(_Frozen):
    """Step 8: TTA inference (original + A/B-swapped, averaged)."""

    max_length: int = 2000
    batch_size: int = 16
    tta: bool = True
    sort_by_length: bool = True
    apply_calibration: bool = True
    slab_tokens: int = 16384
    """CUDA with flex attention (``arena_flex``): rows are packed into slabs of this many tokens
    (gpu/packing.py); it bounds activation memory like a batch size (4096-8192 on 16 GB cards)."""
    fp8: Literal["off", "mlp", "all"] = "off"
    """FP8 linears for TTA on GPUs with FP8 tensor cores (H100: 1.35x bf16 with ``all``, both
    compiled; docs/gpu.md). ``mlp`` keeps the attention projections bf16: on the fidelity
    benchmark's trained student its probabilities stay within 0.003 of bf16 (``all``: 0.02)."""
    gpus: int | None = None
    """GPUs the TTA steps shard rows over (one process per GPU, length-balanced shards, no
    communication): None = every GPU the job sees; 1 = one process."""
    compile: bool = True
    """CUDA with ``arena_flex``: ``torch.compile`` each decoder layer once for the fixed slab shape
    (about a minute of warm-up on an H100; 0.46 -> 0.64 of the bf16 ceiling, docs/gpu.md)."""


class EnsembleSettings(_Frozen):
    """Step 9.

    folds_mean: equal mean of the fold submissions (the seed's step 9).
    folds_cv_weighted: w_k proportional to exp(-(L_k - min L)/tau), L_k the fold's CV log-loss.
    merged: the TTA submission of the averaged-merged-quantized model (1st place's final).
    blend: blend_weight * merged + (1 - blend_weight) * folds_mean.
    """

    mode: Literal["folds_mean", "folds_cv_weighted", "merged", "blend"] = "merged"
    cv_weight_tau: float = 0.01
    blend_weight: float = 0.5


class FoldSettings(_Frozen):
    """Step 2: stratified K-fold (scikit-learn), seed 42, optional grouping by prompt."""

    n_folds: int = 5
    seed: int = 42
    group_by_prompt: bool = False


class StepNeeds(_Frozen):
    """What one step asks of the compute backend (Slurm/k8s). Demo values fit a 2-CPU node."""

    gpus: int = 0
    cpus: int = 1
    mem_gb: int = 4
    time_min: int = 60
    nodes: int = 1
    tasks_per_node: int = 1
    """Ranks per node (Slurm). > 1 on a training step = data-parallel training: one rank per GPU
    (set it to ``gpus``), torch.distributed's env exported by submitit, DDP by the Trainer; rank
    0 alone writes the artifact. ``cpus`` is per rank. ``nodes`` > 1 = multi-node, same code."""


class SlurmSettings(_Frozen):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gres: str | None = None
    """e.g. "gpu:h100:1"; otherwise gpus come from StepNeeds.gpus."""
    setup: list[str] = []
    """Shell lines run before the step (module load, source venv, export HF_HOME=...)."""
    folder: str | None = None
    """submitit folder; default <artifact_root>/.submitit."""
    poll_s: float = 1.0
    signal_delay_s: int = 30
    job_array: bool = False


class K8sSettings(_Frozen):
    image: str = "arena-assets:latest"
    namespace: str = "default"
    artifact_pvc: str = "arena-artifacts"
    artifact_mount: str = "/artifacts"
    node_selector: dict[str, str] = {}
    """Placement of steps that request GPUs (e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})."""
    tolerations: list[dict[str, Any]] = []
    """Tolerations of steps that request GPUs (GPU nodes are usually tainted)."""
    cpu_node_selector: dict[str, str] = {}
    """Placement of steps with ``gpus: 0`` (calibration, averaging): they stay off GPU nodes."""
    env_secrets: dict[str, str] = {}
    """ENV_NAME -> "secret-name:key"; values are never read, only referenced."""
    service_account: str | None = None
    env: dict[str, str] = {}
    """Plain, non-secret environment for step pods (HF_HUB_OFFLINE, HF_HOME=/artifacts/.hf)."""
    image_pull_policy: str = "IfNotPresent"
    images: dict[str, str] = {}
    """Per-step image overrides, e.g. {"quantize": "arena-assets:TAG-quant"} (the GPTQ env)."""
    python: str = "python"
    """Interpreter inside the image that runs ``arena_assets.core.remote``."""
    shm_gb: int = 8
    """Size of the in-memory /dev/shm volume (PyTorch data loaders and NCCL need more than 64M)."""
    poll_s: float = 5.0
    dry_run: bool = False
    """Print and save the Job manifests instead of submitting them (see docs/kubernetes.md)."""
    dry_run_execute: bool = True
    """In a dry run, still execute the pod's command locally so the materialization completes."""


class ComputeSettings(_Frozen):
    backend: Literal["local", "slurm", "k8s"] = "local"
    local_mode: Literal["inprocess", "subprocess"] = "inprocess"
    needs: dict[str, StepNeeds] = {}
    """Per-step overrides keyed by step name (post_pretrain, teacher, teacher_oof, student,
    calibration, predict, average, quantize, tta)."""
    slurm: SlurmSettings = SlurmSettings()
    k8s: K8sSettings = K8sSettings()

    def needs_for(self, step: str) -> StepNeeds:
        return self.needs.get(step, StepNeeds())


class DataPaths(_Frozen):
    """Inputs. Relative paths resolve against the settings file's folder (or the cwd)."""

    train_csv: str = ".arena/inputs/train.csv"
    test_csv: str = ".arena/inputs/test.csv"
    external: str | None = ".arena/inputs/external.csv"
    truth_json: str | None = ".arena/inputs/truth.json"
    """Known-answer sample only: true probabilities for the quality report."""


class SampleSettings(_Frozen):
    """The bundled known-answer sample the demo generates when inputs are missing."""

    train_rows: int = 2000
    test_rows: int = 500
    external_rows: int = 4000
    seed: int = 7


class AutomationSettings(_Frozen):
    """When Dagster re-materializes by itself (the code location reads these; steps never do).

    ``cron``: the tick on which missing or stale partitions (code version changed) are
    re-materialized; nothing current is retrained. ``observe_cron``: how often the raw input files
    are hashed; a changed hash re-materializes their dependents (eager). ``running``: whether the
    automation sensor starts enabled (off by default so ``dagster dev`` after the demo never trains
    behind the user's back).
    """

    cron: str = "0 3 * * *"
    observe_cron: str = "*/5 * * * *"
    running: bool = False


class Settings(_Frozen):
    """The one settings object. Defaults = the embedded CPU demo."""

    artifact_root: str = ".arena/artifacts"
    data: DataPaths = DataPaths()
    sample: SampleSettings = SampleSettings()
    folds: FoldSettings = FoldSettings()
    families: dict[str, ModelSpec] = {"gemma": ModelSpec(), "llama": ModelSpec(tiny=TinyModelConfig(arch="llama"))}
    student_family: str = "gemma"
    teacher_families: list[str] = ["llama"]
    post_pretrain: PostPretrainSettings = PostPretrainSettings()
    fmt: FormatSettings = FormatSettings()
    teacher: TeacherSettings = TeacherSettings()
    student: StudentSettings = StudentSettings()
    baseline: StudentSettings = StudentSettings(kd=KDSettings(alpha=0.0))
    """The CE-only student (the seed's job.sh): same function, alpha=0."""
    calibration: CalibrationSettings = CalibrationSettings()
    average: AverageSettings = AverageSettings()
    quant: QuantSettings = QuantSettings()
    infer: InferSettings = InferSettings()
    ensemble: EnsembleSettings = EnsembleSettings()
    compute: ComputeSettings = ComputeSettings()
    automation: AutomationSettings = AutomationSettings()
    base_dir: str = Field(default=".", exclude=True)
    """Folder that relative paths resolve against (the settings file's folder); not hashed."""

    @model_validator(mode="after")
    def _check_families(self) -> "Settings":
        missing = [f for f in [self.student_family, *self.teacher_families] if f not in self.families]
        if missing:
            raise ValueError(f"families {missing} are used but not defined under `families`")
        return self

    # ---------------------------------------------------------------- paths
    def resolve(self, p: str | None) -> Path | None:
        if p is None:
            return None
        path = Path(os.path.expanduser(p))
        return path if path.is_absolute() else (Path(self.base_dir) / path).resolve()

    @property
    def root(self) -> Path:
        return self.resolve(self.artifact_root)  # type: ignore[return-value]

    # ---------------------------------------------------------------- per-step views
    def for_step(self, step: str, family: str | None = None) -> dict[str, Any]:
        """The settings one step uses, and nothing else: their hash is the asset's code version."""
        fam = family or self.student_family
        views: dict[str, dict[str, Any]] = {
            "folds": {"folds": self.folds},
            "post_pretrain": {"model": self.families[fam], "post_pretrain": self.post_pretrain, "fmt": self.fmt},
            "teacher": {"model": self.families[fam], "teacher": self.teacher, "fmt": self.fmt},
            "teacher_oof": {"fmt": self.fmt, "infer_batch": self.infer.batch_size},
            "student": {"model": self.families[self.student_family], "student": self.student, "fmt": self.fmt},
            "baseline": {"model": self.families[self.student_family], "student": self.baseline, "fmt": self.fmt},
            "calibration": {"calibration": self.calibration},
            "predict": {"fmt": self.fmt, "infer": self.infer},
            "average": {"average": self.average, "calibration": self.calibration},
            "quantize": {"quant": self.quant},
            "tta": {"fmt": self.fmt, "infer": self.infer},
            "ensemble": {"ensemble": self.ensemble},
        }
        if step not in views:
            raise KeyError(f"unknown step {step!r}; known: {sorted(views)}")
        return views[step]


def settings_hash(obj: Any) -> str:
    """A short stable hash of settings (pydantic models, dicts of them, plain values)."""

    def plain(o: Any) -> Any:
        if isinstance(o, BaseModel):
            return o.model_dump(mode="json")
        if isinstance(o, dict):
            return {str(k): plain(v) for k, v in sorted(o.items())}
        if isinstance(o, (list, tuple)):
            return [plain(v) for v in o]
        return o

    blob = json.dumps({"v": STEP_VERSION, "s": plain(obj)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_settings(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load the settings file (YAML or TOML), apply nested ``overrides``, validate.

    ``path`` None: ``$ARENA_SETTINGS`` if set, else ``./arena.yaml`` if present, else defaults.
    Errors name the file and the offending key.
    """
    if path is None:
        path = os.environ.get(SETTINGS_ENV) or ("arena.yaml" if Path("arena.yaml").exists() else None)
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"settings file {p} does not exist")
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: the settings file must be a mapping at the top level")
        base = p.resolve().parent
    if overrides:
        raw = _deep_merge(raw, overrides)
    raw = _overlay(Settings(), raw)
    raw.setdefault("base_dir", str(base))
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"{path or 'settings'}: {loc}: {first['msg']}") from e


def _overlay(default: BaseModel, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` laid over the PARENT's default of every nested settings block.

    Why: pydantic builds a partially given block from its class defaults, so
    ``teacher: {train: {seed: 7}}`` would silently reset the teacher's learning rate to
    ``TrainSettings``' default instead of keeping ``TeacherSettings``' own (1e-3). Only nested
    settings objects are overlaid; dict-valued fields (``families``, ``compute.needs``) and lists
    are replaced as written.
    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        current = getattr(default, key, None) if key in type(default).model_fields else None
        if isinstance(current, BaseModel) and isinstance(value, dict):
            out[key] = {**current.model_dump(mode="python"), **_overlay(current, value)}
        else:
            out[key] = value
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
