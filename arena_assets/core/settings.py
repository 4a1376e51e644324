"""Typed settings for the whole recipe: one file, plain objects, per-step hashes.

Why plain pydantic models in ``core/`` and not Dagster ``Config`` classes: the same objects are
pickled into Slurm jobs, Kubernetes pods and the separate GPTQ environment, none of which has
Dagster installed. The defaults run the embedded demo (tiny models, CPU, minutes); the 1st-place
values for real checkpoints are documented next to each field and collected in
``settings/first_place.example.yaml``.

Staleness: each asset's Dagster ``code_version`` is :func:`settings_hash` of
:meth:`Settings.for_step`: the step's own code version plus the settings its step function
receives (derived from its typed signature in ``core/versions.py``), less the fields marked here
with :func:`speed_only` or :func:`read_by_no_step`; fields marked :func:`hashed_as` enter as a
derived value (the global batch, the attention math); fields marked :func:`opt_in` only when set
away from their default. So changing ``student.kd.alpha`` marks
exactly the student's assets and their dependents stale, ``infer.batch_size`` nothing.
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

CODE_VERSION_KEY = "code_version"
"""The marker's key in a field's ``json_schema_extra`` (also visible in the JSON schema)."""


def speed_only(default: Any, why: str) -> Any:
    """A field that changes how fast, where or how verbosely a step runs, never what it computes
    (batch sizes of inference, GPU counts, compile, logging/save intervals): code versions leave
    it out, so changing it re-runs nothing. ``why`` says why it cannot change the outputs."""
    return Field(default, json_schema_extra={CODE_VERSION_KEY: "speed_only", "why": why})


def read_by_no_step(default: Any, why: str) -> Any:
    """A field no step function reads (kept so settings files stay valid): left out of every code
    version; tests/gpu/test_versions_oracle.py fails if a step starts reading it."""
    return Field(default, json_schema_extra={CODE_VERSION_KEY: "unused", "why": why})


def opt_in(default: Any, why: str) -> Any:
    """A switch added after runs exist, whose default keeps the earlier behaviour: it enters the
    code version only when set to something else. So adding it marks nothing stale (a finished
    run at the default is the same computation), and turning it on marks exactly its steps."""
    return Field(default, json_schema_extra={CODE_VERSION_KEY: "opt_in", "why": why})


def hashed_as(default: Any, derived: str) -> Any:
    """A field that matters only through a derived value (``core/versions.DERIVED``), e.g.
    ``global_batch`` = per-device batch x grad_accum x data-parallel ranks: the versions hash the
    derived value, so 16 x 1 on one rank and 8 x 2 are the same training."""
    return Field(default, json_schema_extra={CODE_VERSION_KEY: f"hashed_as:{derived}"})


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
    attn_implementation: Literal["eager", "flex_attention", "arena_flex", "sdpa", "flash_attention_2"] = hashed_as(
        "eager", "attention_math")
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
    per_device_batch_size: int = hashed_as(16, "global_batch")
    grad_accum: int = hashed_as(1, "global_batch")
    """1st place: global batch 64."""
    max_length: int = 192
    """Training max length (1st place teachers: 1024). The demo's rows are about 130 tokens."""
    label_smoothing: float = 0.0
    group_by_length: bool = True
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = speed_only(False, "recomputes activations to save memory; same gradients")
    save_steps: int = speed_only(50, "how often a resumable checkpoint is written")
    eval_steps: int = speed_only(50, "how often the validation loss is logged (history.json)")
    """Evaluate on the validation fold every N steps (loss curves in history.json); 0 = only once
    at the end."""
    logging_steps: int = speed_only(5, "logging interval")
    dataloader_workers: int = speed_only(0, "data loading processes")
    packing: bool = speed_only(False, "packed slabs give the padded batches' loss (test_packed_student_trains_like_the_padded_one)")
    """One packed slab per batch instead of padded rows (gpu/packing.py): no compute on pad
    tokens; with ``arena_flex`` attention no L x L scores either. Same loss as padding."""
    packing_slab_tokens: int | None = speed_only(None, "slab length of packing (compile shapes)")
    """Fixed slab length (one shape for torch.compile; must hold a whole batch); None = the
    batch's tokens rounded up to 128."""
    compile: bool = speed_only(False, "torch.compile of the same layers")
    """CUDA: ``torch.compile`` each decoder layer (gpu/fast.compile_layers, static shapes). With
    packing + arena_flex it took the 9B student's LoRA step from 0.36 to 0.56 of the H100's bf16
    ceiling (docs/gpu.md); every new slab length compiles once, so pair it with
    ``packing_slab_tokens`` when rows have one length, or expect a compile per length bucket."""

    @model_validator(mode="after")
    def _slab_holds_a_batch(self) -> "TrainSettings":
        """A fixed packed slab must hold a whole batch of rows at their longest: refused at load
        time, not after hours of training at the first long batch (``pack`` raises then)."""
        slab = self.packing_slab_tokens
        if self.packing and slab is not None and slab < self.per_device_batch_size * self.max_length:
            raise ValueError(
                f"packing_slab_tokens={slab} cannot hold a batch of per_device_batch_size="
                f"{self.per_device_batch_size} rows of max_length={self.max_length} tokens; set it to at "
                f"least {self.per_device_batch_size * self.max_length} or leave it null (slab = the batch's tokens)"
            )
        return self


class FormatSettings(_Frozen):
    """How a row becomes a model input (see gpu/formatting.py)."""

    max_length: int = read_by_no_step(192, "training reads TrainSettings.max_length, inference InferSettings.max_length")
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
    oof_max_length: int | None = None
    """Token length of the teacher OOF predictions (step 4); None = the teacher's training
    ``train.max_length`` (1st place: 1024), not ``infer.max_length`` (the student's TTA length)."""

    @property
    def oof_length(self) -> int:
        """The max length ``predict.teacher_oof`` cuts rows to."""
        return self.oof_max_length if self.oof_max_length is not None else self.train.max_length


class KDSettings(_Frozen):
    """Step 5 loss: alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*CE_ls + mse*MSE + cos*(1-cos)."""

    alpha: float = 0.5
    temperature: float = 2.0
    mse_weight: float = 0.0
    cos_weight: float = 0.0
    label_smoothing: float = 0.05
    teacher_families: list[str] | None = None
    """None = every teacher family, averaged (1st place: qwen + llama)."""
    calibrate_teacher: bool = opt_in(False, "off is the KD student as before the switch existed")
    """Distil temperature-calibrated teachers (issue 17, docs/fidelity.md V3): each family's OOF
    logits of each OOF fold are divided by the temperature fitted on that fold's labels (the
    teacher's own held-out fold, which the student trains on), so an underconfident teacher's
    softness is not copied. Off (the 1st place's recipe): the raw OOF probabilities."""


class StudentSettings(_Frozen):
    train: TrainSettings = TrainSettings(learning_rate=1e-3, warmup_steps=10)
    """1st place: lr 5e-5 cosine, 100 warm-up steps, global batch 64, bf16."""
    lora: LoraSettings = LoraSettings()
    kd: KDSettings = KDSettings()


class CalibrationSettings(_Frozen):
    """Per-fold temperature scaling fitted with LBFGS on the fold model's TTA logits of its
    held-out rows (``infer``'s TTA and length: the logits the submissions divide by it)."""

    enabled: bool = True
    max_iter: int = 100
    merged_temperature: Literal["mean", "median", "none"] = "mean"
    """Temperature of the averaged-and-merged model, which has no held-out rows of its own: the
    mean of the fold temperatures, each fitted on the TTA logits of its held-out fold."""


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
    gptq_backend: str = speed_only("auto", "which kernel runs the same quantized weights")
    """GPTQModel's kernel (``gptqmodel.utils.backend.BACKEND``), saved with the model so TTA loads
    it the same way. ``auto`` lets GPTQModel choose; on Hopper it may pick a CUDA kernel that is
    compiled with nvcc at first use. ``gptq_triton`` (TritonV2) needs no compiler and ran the 9B
    shape at 0.98x bf16 on an H200 (docs/gpu.md)."""
    python: str | None = speed_only(None, "which interpreter runs the step, not what it computes")
    """Interpreter of the GPTQ environment (GPTQModel pins protobuf>=7, Dagster <7).
    None: ``$ARENA_QUANT_PYTHON`` or ``.venv-quant/bin/python`` when present."""


class InferSettings(_Frozen):
    """Step 8: TTA inference (original + A/B-swapped, averaged)."""

    max_length: int = 2000
    batch_size: int = speed_only(16, "rows per forward pass; each row's logits do not depend on it")
    tta: bool = True
    sort_by_length: bool = speed_only(True, "order of the forward passes; results are put back in row order")
    apply_calibration: bool = True
    slab_tokens: int = speed_only(16384, "packed slab size, like a batch size")
    """CUDA with flex attention (``arena_flex``): rows are packed into slabs of this many tokens
    (gpu/packing.py); it bounds activation memory like a batch size (4096-8192 on 16 GB cards)."""
    fp8: Literal["off", "mlp", "all"] = "off"
    """FP8 linears for TTA on GPUs with FP8 tensor cores (H100: 1.35x bf16 with ``all``, both
    compiled; docs/gpu.md). ``mlp`` keeps the attention projections bf16: on the fidelity
    benchmark's trained student its probabilities stay within 0.003 of bf16 (``all``: 0.02)."""
    gpus: int | None = speed_only(None, "GPUs the rows are sharded over; rows are independent")
    """GPUs the TTA steps shard rows over (one process per GPU, length-balanced shards, no
    communication): None = every GPU the job sees; 1 = one process."""
    compile: bool = speed_only(True, "torch.compile of the same layers")
    """CUDA with ``arena_flex``: ``torch.compile`` each decoder layer once for the fixed slab shape
    (about a minute of warm-up on an H100; 0.46 -> 0.64 of the bf16 ceiling, docs/gpu.md).
    bf16/fp16 models only: a GPTQ or bitsandbytes model runs its own kernels uncompiled."""
    compile_cache: str | None = speed_only(None, "a cache of compiled kernels; the same kernels either way")
    """Folder for the portable compile cache (gpu/compile_cache.py; None: ``$ARENA_COMPILE_CACHE``,
    else none): the first process writes what it compiled, later jobs, pods and GPU shards load it
    and skip the compile. Shared storage is fine: one small file per model and slab shape."""


class EnsembleSettings(_Frozen):
    """Step 9.

    folds_mean: equal mean of the fold submissions (the seed's step 9).
    folds_cv_weighted: w_k proportional to exp(-(L_k - min L)/tau), L_k the fold's CV log-loss,
    tau = cv_weight_z x the standard error of a difference of two folds' CV log-losses, no fold
    above cv_weight_max_ratio / K (core/ensemble.py says why: fold CVs differ mostly by which
    rows each fold held out).
    merged: the TTA submission of the averaged-merged-quantized model (1st place's final); needs
    no fold submission (final_ensemble then does not depend on them).
    blend: blend_weight * merged + (1 - blend_weight) * folds_mean.
    A fold mode whose fold submissions are missing falls back to the TTA submission alone (the
    seed's step 9) and records it.
    """

    mode: Literal["folds_mean", "folds_cv_weighted", "merged", "blend"] = "merged"
    cv_weight_z: float = 4.5
    """folds_cv_weighted: a fold d noise units (SE of a difference of two fold CVs) worse keeps
    exp(-d / z) of the best fold's weight (1 unit: 0.80; a broken fold, 30 units: < 0.002)."""
    cv_weight_max_ratio: float = 1.25
    """folds_cv_weighted: no fold weighs more than this x 1/K (0.25 of 5 folds)."""
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
    """Ranks per node (Slurm). > 1 on a training step = data-parallel training: one rank per GPU,
    torch.distributed's env exported by submitit, DDP by the Trainer; rank 0 alone writes the
    artifact. ``cpus`` is per rank. ``nodes`` > 1 = multi-node, same code. Under
    ``compute.needs`` a training step's unset value follows ``gpus`` and a different one is
    refused (``ComputeSettings._ranks_follow_gpus``)."""


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
    requeue: bool | None = None
    """``--requeue`` (True) / ``--no-requeue`` (False); None = the cluster's JobRequeue default.
    Checkpointable steps need requeue allowed."""
    lost_job_retries: int = 1
    """How often a step whose job was lost to the cluster (NODE_FAIL, PREEMPTED, BOOT_FAIL and
    not requeued by Slurm) is resubmitted (``dagster.RetryRequested``); a step that raised is not."""


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


DATA_PARALLEL_STEPS = ("post_pretrain", "teacher", "student")
"""Training steps: several GPUs = several ranks (one per GPU, DDP through the Trainer)."""
ONE_PROCESS_STEPS = ("teacher_oof", "predict", "tta", "calibration", "average", "merge", "quantize")
"""Steps that run as one process: the inference ones use every GPU of the job themselves
(``InferSettings.gpus``: one spawned shard process per GPU), the others need at most one."""


def _resolve_ranks(step: str, needs: Any) -> Any:
    """One ``compute.needs`` entry with ``tasks_per_node`` checked against ``gpus`` (see
    :meth:`ComputeSettings._ranks_follow_gpus`); anything malformed is left to pydantic."""
    if isinstance(needs, StepNeeds):
        given, gpus, tasks = "tasks_per_node" in needs.model_fields_set, needs.gpus, needs.tasks_per_node
    elif isinstance(needs, dict):
        given, gpus, tasks = "tasks_per_node" in needs, needs.get("gpus", 0), needs.get("tasks_per_node", 1)
    else:
        return needs
    if not isinstance(gpus, int) or not isinstance(tasks, int):
        return needs
    where = f"compute.needs.{step}"
    if step in DATA_PARALLEL_STEPS:
        if not given and gpus > 1:
            return needs.model_copy(update={"tasks_per_node": gpus}) if isinstance(needs, StepNeeds) else {**needs, "tasks_per_node": gpus}
        if given and gpus > 0 and tasks != gpus:
            raise ValueError(
                f"{where}: tasks_per_node={tasks} but gpus={gpus}: data-parallel training runs one rank per "
                f"GPU (a process never trains on several GPUs); set tasks_per_node: {gpus} or leave it out "
                "(it follows gpus)"
            )
    elif step in ONE_PROCESS_STEPS and given and tasks > 1:
        raise ValueError(
            f"{where}: tasks_per_node={tasks} but {step} runs as one process"
            + (" that uses every GPU of the job (infer.gpus)" if step in ("teacher_oof", "calibration", "predict", "tta") else "")
            + "; leave tasks_per_node out (1)"
        )
    return needs


class ComputeSettings(_Frozen):
    backend: Literal["local", "slurm", "k8s"] = "local"
    local_mode: Literal["inprocess", "subprocess"] = "inprocess"
    needs: dict[str, StepNeeds] = {}
    """Per-step overrides keyed by step name (post_pretrain, teacher, teacher_oof, student,
    calibration, predict, average, merge, quantize, tta). On the training steps
    (``DATA_PARALLEL_STEPS``) ``tasks_per_node`` follows ``gpus`` when left out; see
    :meth:`_ranks_follow_gpus`."""
    slurm: SlurmSettings = SlurmSettings()
    k8s: K8sSettings = K8sSettings()

    @model_validator(mode="before")
    @classmethod
    def _ranks_follow_gpus(cls, data: Any) -> Any:
        """Training steps get one rank per GPU; a mismatch is refused, not run.

        Why: a training step asking for 8 GPUs with one task ran ONE process, which the Trainer
        turned into ``nn.DataParallel`` (8x the per-device batch, the 4-bit base pinned to GPU 0)
        and which now trains on one GPU while seven idle. So on ``post_pretrain``/``teacher``/
        ``student`` an unset ``tasks_per_node`` becomes ``gpus``, and an explicit different value
        (with ``gpus`` > 0; CPU ranks with ``gpus: 0`` stay free) is an error. Inference and
        single-process steps keep one task: ``tasks_per_node`` > 1 there is an error."""
        if isinstance(data, dict) and isinstance(data.get("needs"), dict):
            data = {**data, "needs": {k: _resolve_ranks(str(k), v) for k, v in data["needs"].items()}}
        return data
    max_parallel_jobs: int = 8
    """Slurm/k8s: how many GPU steps Dagster runs at once (the limit of the ``slurm``/``k8s``
    concurrency pool, applied by ``arena-assets pools --apply``); the cluster queues the rest.
    Local runs use one GPU step per visible GPU instead (assets/pools.py)."""

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
        """What one step's code version is made of: its own code version and the settings its
        step function receives, less speed-only fields (``core/versions.step_view``; derived
        from the function's typed signature, never listed by hand). ``settings_hash`` of it is the
        asset's Dagster code version. ``family`` defaults to the student's."""
        from arena_assets.core.versions import step_view

        return step_view(self, step, family)


def settings_hash(obj: Any) -> str:
    """A short stable hash of settings (pydantic models, dicts of them, plain values). Step code
    versions are part of :meth:`Settings.for_step`'s view, not of this hash."""

    def plain(o: Any) -> Any:
        if isinstance(o, BaseModel):
            return o.model_dump(mode="json")
        if isinstance(o, dict):
            return {str(k): plain(v) for k, v in sorted(o.items())}
        if isinstance(o, (list, tuple)):
            return [plain(v) for v in o]
        return o

    blob = json.dumps(plain(obj), sort_keys=True, separators=(",", ":"))
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
        raw = _read_settings_file(p)
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


def _read_settings_file(p: Path) -> Any:
    """Parse a settings file; every failure is a one-line ValueError naming the file (and line).

    Only plain YAML is read (``yaml.safe_load``): a ``!!python/...`` tag is refused, never run.
    """
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"settings file {p}: not valid UTF-8 at byte {e.start}") from None
    except OSError as e:  # a directory, no permission
        raise ValueError(f"settings file {p}: cannot read it ({e.strerror or type(e).__name__})") from None
    if p.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"settings file {p}: not valid TOML ({str(e).splitlines()[0][:200]})") from None
        except RecursionError:
            raise ValueError(f"settings file {p}: not valid TOML (nested too deeply)") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        hint = ("; only plain YAML is read, python tags are never run"
                if isinstance(e, yaml.constructor.ConstructorError) else "")
        raise ValueError(f"settings file {p}{where}: not valid YAML: {str(problem)[:200]}{hint}") from None
    except RecursionError:
        raise ValueError(f"settings file {p}: not valid YAML (nested too deeply)") from None


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
