"""The CPU-testable parts of "the whole recipe on a GPU" (issue 15).

* gradient accumulation divides the loss out (the same global batch gives the same loss and
  gradient whatever the split into micro-batches);
* post-pretraining writes checkpoints and resumes from them;
* one process never wraps the model in ``nn.DataParallel``; every rank's quantized model lands on
  its own GPU;
* quantized models load onto the step's device, and result.json records the devices;
* teacher OOF is predicted at the teachers' training length by default;
* a freshly initialised classification head is the same in every fold;
* a tiny base is built in ``ModelSpec.dtype`` on the step's device (float32 weights unchanged),
  and post-pretraining saves it in that dtype;
* with a fixed packed slab the eval batch is the training batch (16 eval rows overflowed it);
* every step records its own GPU memory peak (none on CPU), and the materialization shows the
  peak and the devices.

Everything runs on tiny random models on CPU; the GPU-only behaviour is checked through the pure
helpers that decide it (or faked CUDA counters), plus one CUDA-only test (marked ``gpu``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arena_assets.core.settings import LoraSettings, TrainSettings
from tests.gpu.tiny_models import gemma2_classifier, word_tokenizer

VOCAB = [f"w{i}" for i in range(40)]


def _tiny() -> tuple[Any, Any]:
    tok = word_tokenizer(VOCAB, padding_side="right")
    return gemma2_classifier(tok, seed=0), tok


def _random_dataset(n: int, seed: int) -> Any:
    from arena_assets.gpu.data import PairDataset

    rng = np.random.default_rng(seed)
    ids = [list(rng.integers(2, 40, size=int(rng.integers(6, 20)))) for _ in range(n)]
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=n)]
    return PairDataset(ids, labels)


# ------------------------------------------------------------------------ 1. gradient accumulation
def _first_steps(per_device: int, accum: int) -> list[dict[str, float]]:
    """Train loss and grad norm of the first two optimizer steps at learning rate 0 (the weights
    never move, so both runs see the same model and the same 16-row global batches)."""
    from arena_assets.gpu.train import fit

    model, tok = _tiny()
    cfg = TrainSettings(
        learning_rate=0.0, per_device_batch_size=per_device, grad_accum=accum, max_steps=2, warmup_steps=0,
        logging_steps=1, eval_steps=0, group_by_length=False, lr_scheduler="constant", seed=3,
    )
    kd = {"alpha": 0.0, "temperature": 1.0, "label_smoothing": 0.0}
    _, info = fit("test", model, tok, cfg, _random_dataset(64, 0), None, kd, None, {})
    return [h for h in info["history"] if "loss" in h and "grad_norm" in h]


def test_gradient_accumulation_divides_the_loss_out() -> None:
    one = _first_steps(per_device=16, accum=1)
    four = _first_steps(per_device=4, accum=4)
    assert len(one) == len(four) == 2, (one, four)
    for a, b in zip(one, four):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3), (one, four)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-3), (one, four)
    # an untrained 3-way classifier's CE is near ln 3, not 4 x ln 3
    assert one[0]["loss"] < 2.0


# ------------------------------------------------------------------------ 2. post-pretraining resumes
def test_post_pretraining_checkpoints_and_resumes(data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped mid-epoch (a Slurm time limit, a requeue) leaves checkpoints; the re-run
    resumes from the last one instead of starting the epoch again."""
    from arena_assets.core.settings import ModelSpec, PostPretrainSettings, settings_hash
    from arena_assets.gpu import data as gdata
    from arena_assets.gpu.pretrain import post_pretrain
    from arena_assets.gpu.train import checkpoint_dir_for
    from tests.gpu.conftest import FMT, MAX_LEN, TINY

    cfg = PostPretrainSettings(
        train=TrainSettings(learning_rate=4e-3, per_device_batch_size=16, max_length=MAX_LEN, num_epochs=1,
                            lr_scheduler="linear", warmup_steps=2, logging_steps=2, save_steps=3, eval_steps=0),
        max_rows=320,  # 288 training rows: 18 steps
    )
    spec = ModelSpec(tiny=TINY)
    corpus = [data["train"], data["test"]]
    ckpt = checkpoint_dir_for(tmp_path / "ckpt", "post_pretrain", "_", settings_hash(cfg), "data-v1")

    calls = {"n": 0}
    orig = gdata.PadCollator.__call__

    def stop_after_seven_batches(self: Any, items: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt("time limit (simulated)")
        return orig(self, items)

    with monkeypatch.context() as m:
        m.setattr(gdata.PadCollator, "__call__", stop_after_seven_batches)
        with pytest.raises(KeyboardInterrupt, match="simulated"):
            post_pretrain(spec, cfg, FMT, data["external"], corpus, out_dir=tmp_path / "stopped", checkpoint_dir=ckpt)
    assert not (tmp_path / "stopped").exists()
    saved = sorted(int(p.parent.name.split("-")[1]) for p in ckpt.glob("checkpoint-*/trainer_state.json"))
    assert saved and saved[-1] >= 3, saved

    r = post_pretrain(spec, cfg, FMT, data["external"], corpus, out_dir=tmp_path / "resumed", checkpoint_dir=ckpt)
    info = r.info["train"]
    assert info["resumed_from"] is not None and info["resumed_global_step"] == saved[-1]
    assert info["global_step"] == 18
    assert r.info["devices"] == ["cpu"] and info["devices"] == ["cpu"]

    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1e-3})})
    with pytest.raises(ValueError, match="belongs to other settings"):
        post_pretrain(spec, changed, FMT, data["external"], corpus, out_dir=tmp_path / "wrong", checkpoint_dir=ckpt)
    assert not (tmp_path / "wrong").exists()


# ------------------------------------------------------------------------ 3. one GPU per process
def test_a_single_process_never_wraps_in_data_parallel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What the Trainer does on a node with 4 visible GPUs and no torch.distributed: n_gpu=4,
    nn.DataParallel and a 4x batch. Simulated by the device setup; the step's args must say 1."""
    import functools

    import torch
    from transformers import TrainingArguments

    from arena_assets.gpu import train as gtrain
    from arena_assets.gpu.data import PadCollator

    real_setup = TrainingArguments._setup_devices.func

    def four_gpus_one_process(self: Any) -> Any:
        dev = real_setup(self)  # the CPU here
        self._n_gpu = 4
        return dev

    prop = functools.cached_property(four_gpus_one_process)
    prop.__set_name__(TrainingArguments, "_setup_devices")
    monkeypatch.setattr(TrainingArguments, "_setup_devices", prop)

    cfg = TrainSettings(per_device_batch_size=4, grad_accum=2, max_steps=1, eval_steps=0)
    args = gtrain._training_args(cfg, str(tmp_path), save=False, has_eval=False)
    assert args.n_gpu == 1
    assert args.train_batch_size == 4  # not 4 x n_gpu
    model, tok = _tiny()
    trainer = gtrain._make_trainer_cls()(
        model=model, args=args, train_dataset=_random_dataset(8, 0), data_collator=PadCollator(tok.pad_token_id),
        processing_class=tok, kd={"alpha": 0.0, "temperature": 1.0, "label_smoothing": 0.0},
    )
    assert not isinstance(trainer._wrap_model(trainer.model_wrapped), torch.nn.DataParallel)


def test_each_rank_places_a_quantized_model_on_its_own_gpu() -> None:
    from arena_assets.gpu.models import placement, placement_kwargs

    assert placement_kwargs(True, 8, 3) == {"device_map": {"": 3}}
    # a Slurm task that sees only its own GPU (CUDA_VISIBLE_DEVICES = its local rank): index 0,
    # the rule accelerate uses for the Trainer's device
    assert placement_kwargs(True, 1, 3) == {"device_map": {"": 0}}
    assert placement_kwargs(True, 0, 0) == {"device_map": {"": "cpu"}}
    assert placement_kwargs(False, 8, 3) == {}  # plain models are moved with .to(device())
    assert placement(8, 5) == "cuda:5" and placement(0, 2) == "cpu"


def _save_tiny_dir(d: Path, quantization_config: dict[str, Any] | None = None) -> Path:
    from arena_assets.gpu.formatting import PLAIN_FORMAT
    from arena_assets.gpu.models import save_classifier

    model, tok = _tiny()
    save_classifier(model, tok, PLAIN_FORMAT, d)
    if quantization_config is not None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"] = quantization_config
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("kind", ["bnb_4bit_base", "gptq_checkpoint"])
def test_quantized_loads_go_to_this_ranks_gpu(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kwargs ``from_pretrained`` receives for rank 1 of a node with 2 GPUs (CUDA faked; the
    load itself is replaced by a plain tiny model)."""
    import transformers

    from arena_assets.core.settings import ModelSpec
    from arena_assets.gpu import models

    gptq = {"quant_method": "gptq", "bits": 8, "group_size": 32, "desc_act": False, "sym": True}
    d = _save_tiny_dir(tmp_path / kind, gptq if kind == "gptq_checkpoint" else None)
    spec = ModelSpec(path=str(d), quantize_base="4bit") if kind == "bnb_4bit_base" else None
    seen: dict[str, Any] = {}

    def fake_from_pretrained(cls: Any, path: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return _tiny()[0]

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", classmethod(fake_from_pretrained))
    monkeypatch.setattr(models, "cuda_count", lambda: 2, raising=False)
    monkeypatch.setattr(models, "_cuda", lambda: True, raising=False)  # the old code's CUDA check
    monkeypatch.setenv("LOCAL_RANK", "1")
    models.load_pretrained(d, spec)
    assert seen.get("device_map") == {"": 1}, seen


# ------------------------------------------------------------------------ 4. devices in result.json
def test_inference_steps_record_their_devices(data: dict[str, Any], tmp_path: Path) -> None:
    from arena_assets.gpu.predict import tta_submission
    from tests.gpu.conftest import FMT, INFER

    d = _save_tiny_dir(tmp_path / "model")
    r = tta_submission(d, None, FMT, INFER.model_copy(update={"gpus": 1}), data["valid0"], out_dir=tmp_path / "tta")
    assert r.info["devices"] == ["cpu"]
    assert json.loads((tmp_path / "tta" / "result.json").read_text())["info"]["devices"] == ["cpu"]


def test_quantize_probes_on_the_steps_device(data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full-precision probe runs where the step runs (``models.device()``), and the devices
    of both probes are recorded."""
    import torch

    from arena_assets.core.settings import QuantSettings
    from arena_assets.gpu import models
    from arena_assets.gpu.quantize import quantize
    from tests.gpu.conftest import FMT

    asked = []

    def step_device() -> Any:
        asked.append(True)
        return torch.device("cpu")

    monkeypatch.setattr(models, "device", step_device)
    d = _save_tiny_dir(tmp_path / "merged")
    r = quantize(d, QuantSettings(methods=["none"], n_calibration=4, calibration_max_length=32), FMT, data["train"],
                 out_dir=tmp_path / "q")
    assert asked, "the fp model was not placed on the step's device"
    assert r.info["devices"] == ["cpu"]


# ------------------------------------------------------------------------ 7. teacher OOF length
def test_teacher_oof_uses_the_teachers_length(data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from arena_assets.core.settings import TeacherSettings
    from arena_assets.gpu import predict
    from tests.gpu.conftest import FMT, INFER

    t = TeacherSettings(train=TrainSettings(max_length=1024))
    assert t.oof_length == 1024  # not InferSettings.max_length (2000)
    assert t.model_copy(update={"oof_max_length": 512}).oof_length == 512

    lengths = []
    orig = predict.tta_logits

    def spy(model: Any, tok: Any, df: Any, fmt: Any, infer: Any, desc: str = "tta", max_length: Any = None) -> Any:
        lengths.append(max_length if max_length is not None else infer.max_length)
        return orig(model, tok, df, fmt, infer, desc=desc, max_length=max_length)

    monkeypatch.setattr(predict, "tta_logits", spy)
    d = _save_tiny_dir(tmp_path / "teacher")
    r = predict.teacher_oof(d, FMT, INFER, data["valid0"], 0, "fam", out_dir=tmp_path / "oof", max_length=48)
    assert lengths == [48] and r.info["max_length"] == 48
    assert r.info["devices"] == ["cpu"]


# ------------------------------------------------------------------------ 8. seeded head
def test_a_new_head_starts_equal_in_every_fold(tmp_path: Path) -> None:
    """A real base loaded without post-pretraining has no 3-way head: it is created at load
    time, and must be the same in every fold (the folds are averaged) whatever the RNG did before."""
    import torch
    from transformers import Gemma2Config, Gemma2Model

    from arena_assets.gpu.train import prepare_model

    tok = word_tokenizer(VOCAB, padding_side="right")
    cfg = Gemma2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, pad_token_id=tok.pad_token_id)
    d = tmp_path / "base"
    torch.manual_seed(0)
    Gemma2Model(cfg).save_pretrained(d)  # a decoder checkpoint: no `score` head
    tok.save_pretrained(d)

    def head(rng: int, lora: LoraSettings) -> Any:
        torch.manual_seed(rng)  # whatever earlier folds or steps left in the global RNG
        before = torch.get_rng_state()
        model, _, _ = prepare_model(d, lora, TrainSettings())
        w = [p.detach().clone() for n, p in model.named_parameters() if "score" in n]
        assert w, [n for n, _ in model.named_parameters()][-5:]
        return w, torch.equal(before, torch.get_rng_state())

    for lora in (LoraSettings(enabled=False), LoraSettings(r=4, alpha=8)):
        (a, _), (b, _) = head(1, lora), head(2, lora)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), lora
    other, _ = head(1, LoraSettings(enabled=False, init_seed=7))
    same, _ = head(1, LoraSettings(enabled=False))
    assert not torch.equal(other[0], same[0])  # the seed is what decides the head


# ------------------------------------------------------------------------ 5. bitsandbytes on GPU nodes
def test_gpu_requirements_install_bitsandbytes() -> None:
    root = Path(__file__).resolve().parents[2]
    lines = [ln.split("#")[0].strip() for ln in (root / "requirements" / "gpu.txt").read_text().splitlines()]
    assert any(ln.startswith("bitsandbytes>=") for ln in lines), lines


def test_checkpoint_fingerprint_ignores_speed_only_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint belongs to the settings that change results: halving the per-device batch at
    the same global batch (an out-of-memory fix) or another logging interval still resumes it;
    another learning rate does not (the fingerprint used to hold every field)."""
    from arena_assets.core.settings import TeacherSettings, TrainSettings
    from arena_assets.gpu.train import _check_fingerprint, result_settings

    def fp(**train: object) -> dict:
        return {"step": "teacher", **result_settings(cfg=TeacherSettings(train=TrainSettings(**train)))}

    base = fp(per_device_batch_size=16, grad_accum=1, logging_steps=5)
    _check_fingerprint(tmp_path, base)
    _check_fingerprint(tmp_path, fp(per_device_batch_size=8, grad_accum=2, logging_steps=1, save_steps=7))
    with pytest.raises(Exception, match="belongs to other settings"):
        _check_fingerprint(tmp_path, fp(per_device_batch_size=16, grad_accum=1, learning_rate=1e-4))


# ------------------------------------------------------------------------ 9. tiny models in the spec's dtype
def test_build_tiny_builds_in_the_spec_dtype_where_the_step_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A "tiny" config at a real width (the GPU end-to-end run) was initialised in float32 on the
    CPU, then saved as float32: ``build_tiny`` now builds in ``ModelSpec.dtype`` on
    ``models.device()``. The float32 default must still give the very same weights (same seed)
    as the plain constructor, so existing tiny artifacts and their versions do not move."""
    import torch

    from arena_assets.core.settings import TinyModelConfig
    from arena_assets.gpu import models
    from arena_assets.gpu.models import build_tiny, train_word_tokenizer

    cfg = TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, intermediate_size=64, max_position_embeddings=128)
    tok = train_word_tokenizer(["w1 w2 w3 good bad"], 64, 128)
    for arch in ("gemma2", "llama"):
        c = cfg.model_copy(update={"arch": arch})
        f32 = build_tiny(c, tok)
        assert {p.dtype for p in f32.parameters()} == {torch.float32}, arch
        torch.manual_seed(c.seed)
        plain = type(f32)(f32.config)  # what build_tiny returned before issue 15
        want = plain.state_dict()
        got = f32.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), arch

        bf16 = build_tiny(c, tok, "eager", "bfloat16")
        assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}, arch
        assert {str(p.device) for p in bf16.parameters()} == {str(models.device())}

    # built where the step runs: whatever models.device() says (meta here: no memory, no CUDA needed)
    monkeypatch.setattr(models, "device", lambda: torch.device("meta"))
    assert {p.device.type for p in build_tiny(cfg, tok, "eager", "bfloat16").parameters()} == {"meta"}


def test_tiny_post_pretrain_saves_a_base_in_the_spec_dtype(data: dict[str, Any], tmp_path: Path) -> None:
    """The tiny base written by post-pretraining is in ``ModelSpec.dtype`` on disk (a bf16 spec
    saved float32 weights: twice the bytes, and a float32 load downstream), and result.json says
    which dtype it was built in."""
    from safetensors import safe_open

    from arena_assets.core.settings import ModelSpec, PostPretrainSettings
    from arena_assets.gpu.pretrain import post_pretrain
    from tests.gpu.conftest import FMT, TINY

    spec = ModelSpec(tiny=TINY, dtype="bfloat16")
    r = post_pretrain(spec, PostPretrainSettings(enabled=False), FMT, None, [data["train"]], out_dir=tmp_path / "pp")
    d = r.path("model")
    files = sorted(d.glob("*.safetensors"))
    assert files, sorted(p.name for p in d.iterdir())
    dtypes = set()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            dtypes |= {sf.get_slice(k).get_dtype() for k in sf.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {"BF16"}, dtypes
    assert json.loads((d / "config.json").read_text()).get("dtype") == "bfloat16"
    assert r.info["built"]["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "pp" / "result.json").read_text())["info"]["built"]["dtype"] == "bfloat16"


# ------------------------------------------------------------------------ 10. packed eval batches
def test_packed_eval_batches_fit_a_fixed_slab() -> None:
    """With a fixed packed slab the Trainer's eval batch is the training batch: 16 eval rows
    (the old ``max(bs, 16)``) do not fit a slab sized for ``per_device_batch_size`` rows and
    ``pack`` raised "do not fit a slab" at the first evaluation."""
    import math

    from arena_assets.gpu.train import _training_args, fit

    bs, max_len = 2, 20  # _random_dataset rows are 6..19 tokens: a batch of 2 always fits 40
    cfg = TrainSettings(
        learning_rate=1e-3, per_device_batch_size=bs, max_length=max_len, packing=True,
        packing_slab_tokens=bs * max_len, max_steps=2, warmup_steps=0, logging_steps=1, eval_steps=0,
        group_by_length=False, lr_scheduler="constant", seed=3,
    )
    valid = _random_dataset(20, 1)
    assert sum(len(valid[i]["input_ids"]) for i in range(16)) > bs * max_len  # 16 rows overflow the slab
    model, tok = _tiny()
    kd = {"alpha": 0.0, "temperature": 1.0, "label_smoothing": 0.0}
    _, info = fit("test", model, tok, cfg, _random_dataset(16, 0), valid, kd, None, {})
    assert info["global_step"] == 2
    assert math.isfinite(info["final_eval_loss"]) and 0.0 < info["final_eval_loss"] < 3.0, info
    # padded batches (no fixed slab) keep the larger eval batch
    args = _training_args(cfg.model_copy(update={"packing_slab_tokens": None}), "/tmp/unused", save=False, has_eval=True)
    assert args.per_device_eval_batch_size == 16


# ------------------------------------------------------------------------ 11. GPU memory peak per step
def _step_with_peak(gib: float, devices: list[str], peaks: dict[int, int], *, out_dir: Path) -> Any:
    """A step that 'allocates' ``gib`` on fake GPU 1 (``peaks`` stands in for torch's counters)."""
    from arena_assets.core.results import StepResult, step_output

    with step_output(out_dir, "peak") as (_tmp, res):
        peaks[1] = max(peaks[1], int(gib * 2**30))
        res.info["devices"] = devices
    return StepResult.read(out_dir)


def test_each_step_records_its_own_gpu_peak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step that used CUDA records its peak GPU memory in result.json (the largest over its
    GPUs), the in-process backend starts a new peak per step (one process runs many steps), and
    the materialization's metadata shows the peak and the devices: a CPU fallback on a GPU node
    is visible in the UI. torch's CUDA counters are faked, so this runs on CPU."""
    import torch

    from arena_assets.assets.common import Materialization
    from arena_assets.core import artifacts
    from arena_assets.core.settings import StepNeeds
    from arena_assets.resources.compute import LocalBackend

    peaks = {0: int(0.125 * 2**30), 1: 0}
    resets: list[int] = []

    def reset(i: int = 0) -> None:
        resets.append(i)
        peaks[i] = 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=0: peaks[i])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)

    backend = LocalBackend(tmp_path, "inprocess")
    big_out = artifacts.new_version_dir(tmp_path, "big")
    big = backend.run(None, "big", _step_with_peak, [3.0, ["cuda:1"], peaks], {}, big_out, StepNeeds())
    assert sorted(resets) == [0, 1]  # a new peak on every GPU before the step
    assert big.info["gpu_peak_gib"] == 3.0
    assert json.loads((big_out / "result.json").read_text())["info"]["gpu_peak_gib"] == 3.0

    small_out = artifacts.new_version_dir(tmp_path, "small")
    small = backend.run(None, "small", _step_with_peak, [0.5, ["cuda:1"], peaks], {}, small_out, StepNeeds())
    assert small.info["gpu_peak_gib"] == 0.5  # not the previous step's 3.0

    m = Materialization(root=tmp_path, key="big", partition=None, code_version="cv", out_dir=big_out)
    md = m.metadata(big)
    assert md["devices"] == "cuda:1" and md["gpu_peak_gib"] == 3.0


def test_a_cpu_step_records_no_gpu_peak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CUDA there is no peak to report: no ``gpu_peak_gib`` key (not a misleading 0), and
    the metadata has no GPU peak but still the devices."""
    import torch

    from arena_assets.assets.common import Materialization
    from arena_assets.core import artifacts
    from arena_assets.core.results import cuda_peak_gib, reset_cuda_peak
    from arena_assets.core.settings import StepNeeds
    from arena_assets.resources.compute import LocalBackend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_peak_gib() is None
    reset_cuda_peak()  # a no-op without CUDA, not an error
    out = artifacts.new_version_dir(tmp_path, "cpu")
    r = LocalBackend(tmp_path, "inprocess").run(None, "cpu", _step_with_peak, [0.0, ["cpu"], {1: 0}], {}, out,
                                                StepNeeds())
    assert "gpu_peak_gib" not in r.info
    assert "gpu_peak_gib" not in json.loads((out / "result.json").read_text())["info"]
    md = Materialization(root=tmp_path, key="cpu", partition=None, code_version="cv", out_dir=out).metadata(r)
    assert md["devices"] == "cpu" and "gpu_peak_gib" not in md


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_a_real_gpu_step_records_its_peak(tmp_path: Path) -> None:
    """On a real GPU: a step that allocates 256 MiB records a peak of at least 0.25 GiB; the next
    step in the same process, which allocates 1 MiB, records its own small peak."""
    import torch

    from arena_assets.core import artifacts
    from arena_assets.core.settings import StepNeeds
    from arena_assets.resources.compute import LocalBackend

    def alloc(mib: int, *, out_dir: Path) -> Any:
        from arena_assets.core.results import StepResult, step_output

        with step_output(out_dir, "alloc") as (_tmp, res):
            x = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda")
            x.fill_(1)
            res.info["devices"] = [str(x.device)]
            del x
        return StepResult.read(out_dir)

    torch.cuda.init()
    base_gib = max(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30
    backend = LocalBackend(tmp_path, "inprocess")
    big = backend.run(None, "big", alloc, [256], {}, artifacts.new_version_dir(tmp_path, "big"), StepNeeds())
    small = backend.run(None, "small", alloc, [1], {}, artifacts.new_version_dir(tmp_path, "small"), StepNeeds())
    assert big.info["gpu_peak_gib"] >= 0.25, big.info
    assert small.info["gpu_peak_gib"] < base_gib + 0.05 < big.info["gpu_peak_gib"], (base_gib, small.info)


# ------------------------------------------------- quantized models: TTA never compiles their layers
@pytest.mark.parametrize("quantized", [False, True])
def test_tta_compiles_layers_of_plain_models_only(quantized: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``InferSettings.compile`` compiles the decoder layers of a bf16 model before the packed
    TTA pass, never those of a GPTQ/bitsandbytes model. Why: on the H200 the GPTQ model's TTA
    (its Triton kernels autotune inside ``torch.compile``) had not finished after minutes, where the
    bf16 fold models compiled in seconds (benchmarks/results/gpu_e2e.json's notes).

    The packed path runs for real on CPU (arena_flex's eager reference); only the GPU test
    (``_use_fast``: "is the model on CUDA") is answered yes, and ``compile_layers`` is a spy."""
    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu import fast, models, packing, predict
    from tests.gpu.test_fast import _tiny

    df, tok, model = _tiny(12)
    packing.register_attention()
    model.config._attn_implementation = packing.ATTN_NAME
    if quantized:  # what transformers sets on a GPTQ/bitsandbytes model
        model.hf_quantizer = object()
    compiled: list[Any] = []
    monkeypatch.setattr(predict, "_use_fast", lambda m: True)
    monkeypatch.setattr(fast, "compile_layers", lambda m, dynamic=False: compiled.append(m))

    class Fmt:
        prompt_max_tokens = 12

    infer = InferSettings(max_length=96, tta=True, slab_tokens=512, compile=True)
    z = predict.tta_logits(model, tok, df, Fmt, infer)
    assert z.shape == (len(df), 3) and np.isfinite(z).all()
    assert models.is_quantized(model) is quantized
    assert compiled == ([] if quantized else [model])
