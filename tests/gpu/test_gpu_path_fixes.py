"""The CPU-testable parts of "the whole recipe on a GPU" (issue 15).

* gradient accumulation divides the loss out (the same global batch gives the same loss and
  gradient whatever the split into micro-batches);
* post-pretraining writes checkpoints and resumes from them;
* one process never wraps the model in ``nn.DataParallel``; every rank's quantized model lands on
  its own GPU;
* quantized models load onto the step's device, and result.json records the devices;
* teacher OOF is predicted at the teachers' training length by default;
* a freshly initialised classification head is the same in every fold.

Everything runs on tiny random models on CPU; the GPU-only behaviour is checked through the pure
helpers that decide it.
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
