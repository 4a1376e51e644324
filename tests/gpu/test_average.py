"""Step 6 on tiny real models (CPU): LoRA averaging, mean of deltas, merge, merged temperature.

Fixtures are built directly with transformers/tokenizers/peft (a random-init Gemma-2 sequence
classifier, a word-level tokenizer trained offline, LoRA adapters with the score head in
``modules_to_save``), so these tests depend on nothing but the libraries and gpu/average.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from arena_assets.core.results import StepResult
from arena_assets.core.settings import AverageSettings, CalibrationSettings
from arena_assets.gpu import average

WORDS = [f"w{i}" for i in range(120)]
N_FOLDS = 5


def build_base(path: Path) -> Path:
    """A tiny random-init Gemma-2 3-way classifier + a word-level tokenizer, saved offline."""
    from tiny_models import gemma2_classifier, word_tokenizer

    hf_tok = word_tokenizer(WORDS, padding_side="left")
    model = gemma2_classifier(hf_tok)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


def make_adapter(
    base_dir: Path, out: Path, *, seed: int = 1234, r: int = 8, train_seed: int = 0, alpha: int = 16
) -> Path:
    """A LoRA adapter as a fold's training would leave it: init from ``seed`` (the fold-shared
    init seed), then A perturbed a little and B made non-zero from ``train_seed`` (the fold's
    training), score head in modules_to_save and changed too."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, attn_implementation="eager")
    cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=r,
        lora_alpha=alpha,
        target_modules="all-linear",
        lora_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(10_000 + train_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "lora_A" in name:
                p.add_(0.1 * p.std() * noise)
            elif "lora_B" in name:
                p.copy_(0.05 * noise)
            else:  # the score head copy in modules_to_save
                p.add_(0.05 * noise)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    base = build_base(root / "base")
    adapters = [make_adapter(base, root / f"fold{k}", train_seed=k) for k in range(N_FOLDS)]
    return root, base, adapters


def _inputs(tok_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    texts = [" ".join(WORDS[i : i + 12]) for i in range(0, 60, 7)]
    return tok(texts, return_tensors="pt", padding=True)


def _peft_logits(base_dir: Path, adapter_dir: Path, inputs) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, attn_implementation="eager")
    m = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return m(**inputs).logits


def _full_logits(model_dir: Path, inputs) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(
        model_dir, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return m(**inputs).logits


def test_mean_of_identical_adapters_is_that_adapter(setup, tmp_path):
    _root, base, adapters = setup
    res = average.average_adapters(
        [adapters[0]] * N_FOLDS, AverageSettings(), out_dir=tmp_path / "v1"
    )
    assert isinstance(res, StepResult)
    out = res.path("adapter")
    assert (out / "adapter_config.json").exists() and (out / "tokenizer.json").exists()
    got = average._load_adapter_tensors(out)
    want = average._load_adapter_tensors(adapters[0])
    assert set(got) == set(want) and any("score" in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-7)
    # and it behaves as that adapter
    x = _inputs(base)
    torch.testing.assert_close(
        _peft_logits(base, out, x), _peft_logits(base, adapters[0], x), rtol=0, atol=1e-6
    )
    assert StepResult.read(tmp_path / "v1").paths["adapter"] == "adapter"


def test_mean_adapters_is_elementwise_mean(setup, tmp_path):
    _, _, adapters = setup
    res = average.average_adapters(
        adapters, AverageSettings(method="mean_adapters"), out_dir=tmp_path / "v"
    )
    got = average._load_adapter_tensors(res.path("adapter"))
    folds = [average._load_adapter_tensors(a) for a in adapters]
    for k in got:
        want = torch.stack([f[k] for f in folds]).mean(0)
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
    # the head is averaged too, and the folds really differed
    head = next(k for k in got if "score" in k)
    assert not torch.allclose(folds[0][head], folds[1][head])
    assert res.metrics["min_lora_A_cosine"] > average.MIN_A_COSINE


def test_merge_matches_unmerged_and_writes_mean_temperature(setup, tmp_path):
    _, base, adapters = setup
    avg = average.average_adapters(adapters, AverageSettings(), out_dir=tmp_path / "avg")
    temps = [1.1, 0.9, 1.3, 1.0, 1.2]
    # fold temperatures may come as calibration.json files
    cal_files = []
    for k, t in enumerate(temps):
        p = tmp_path / f"cal{k}" / "calibration.json"
        p.parent.mkdir()
        p.write_text(json.dumps({"temperature": t, "nll_before": 1.0, "nll_after": 0.9}))
        cal_files.append(p)
    res = average.merge_adapter(
        avg.path("adapter"), cal_files, CalibrationSettings(), out_dir=tmp_path / "m"
    )
    model_dir = res.path("model")
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()
    assert not (model_dir / "adapter_config.json").exists()
    x = _inputs(base)
    unmerged = _peft_logits(base, avg.path("adapter"), x)
    merged = _full_logits(model_dir, x)
    assert (unmerged - merged).abs().max().item() < 1e-4
    assert res.metrics["merge_max_abs_diff"] < 1e-4
    cal = json.loads(res.path("calibration").read_text())
    assert cal["rule"] == "mean" and cal["fold_temperatures"] == temps
    assert cal["temperature"] == pytest.approx(sum(temps) / len(temps))
    # median rule and "none"
    assert average.merged_temperature(temps, CalibrationSettings(merged_temperature="median")) == (
        1.1,
        "median",
    )
    assert average.merged_temperature(temps, CalibrationSettings(merged_temperature="none")) == (
        1.0,
        "none",
    )


def test_mean_deltas_equals_mean_of_merged_models(setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    _, base, adapters = setup
    folds = adapters[:3]
    res = average.average_adapters(
        folds, AverageSettings(method="mean_deltas"), out_dir=tmp_path / "d"
    )
    model_dir = res.path("model")
    got = AutoModelForSequenceClassification.from_pretrained(model_dir).state_dict()
    merged_sds = []
    for a in folds:
        b = AutoModelForSequenceClassification.from_pretrained(base)
        merged_sds.append(PeftModel.from_pretrained(b, str(a)).merge_and_unload().state_dict())
    base_sd = AutoModelForSequenceClassification.from_pretrained(base).state_dict()
    changed = 0
    for k, v in got.items():
        want = torch.stack([sd[k] for sd in merged_sds]).mean(0)
        torch.testing.assert_close(v, want, rtol=0, atol=1e-5)
        changed += int(not torch.allclose(v, base_sd[k]))
    assert changed > 10  # every LoRA target and the head moved
    assert res.metrics["n_lora_layers"] > 0 and res.metrics["n_heads"] == 1
    # differs from the plain mean of adapters (mean(B)@mean(A) != mean(B@A))
    plain = average.average_adapters(folds, AverageSettings(), out_dir=tmp_path / "p")
    x = _inputs(base)
    assert not torch.allclose(
        _peft_logits(base, plain.path("adapter"), x), _full_logits(model_dir, x), atol=1e-6
    )
    # merge_adapter passes a full model through and still writes the temperature
    m = average.merge_adapter(model_dir, [1.0, 2.0], CalibrationSettings(), out_dir=tmp_path / "m")
    torch.testing.assert_close(_full_logits(m.path("model"), x), _full_logits(model_dir, x))
    assert json.loads(m.path("calibration").read_text())["temperature"] == pytest.approx(1.5)


def test_refuses_different_ranks(setup, tmp_path):
    _, base, adapters = setup
    other = make_adapter(base, tmp_path / "r4", r=4)
    with pytest.raises(average.AdapterMismatchError, match=r"different configs.*\br\b"):
        average.average_adapters([adapters[0], other], AverageSettings(), out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_refuses_different_init_seeds(setup, tmp_path):
    _, base, adapters = setup
    other = make_adapter(base, tmp_path / "seed", seed=999, train_seed=1)
    with pytest.raises(average.AdapterMismatchError, match="init seed"):
        average.average_adapters([adapters[0], other], AverageSettings(), out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # a recorded init seed is checked too
    for d, s in ((adapters[0], 1), (adapters[1], 2)):
        (d / average.LORA_INIT_FILE).write_text(json.dumps({"init_seed": s}))
    try:
        with pytest.raises(average.AdapterMismatchError, match="init seeds"):
            average.average_adapters(adapters[:2], AverageSettings(), out_dir=tmp_path / "y")
    finally:
        for d in adapters[:2]:
            (d / average.LORA_INIT_FILE).unlink()


# --- issue 15: the merge runs where the step runs, and says where ---------------------------------
def test_merge_and_mean_deltas_run_on_the_steps_device_and_record_it(
    setup: tuple[Path, Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 9B merge and its probe forward on a GPU node's CPU took minutes: the base is loaded on
    ``models.device()`` and result.json records the devices of the merged weights, so a CPU
    fallback shows (["cpu"] here, ["cuda:0"] on a GPU)."""
    from arena_assets.gpu import models

    real_device = models.device
    asked: list[str] = []

    def step_device() -> torch.device:
        asked.append("device")
        return real_device()

    monkeypatch.setattr(models, "device", step_device)
    want = [str(real_device())]
    _, _, adapters = setup
    avg = average.average_adapters(adapters[:2], AverageSettings(), out_dir=tmp_path / "avg")
    m = average.merge_adapter(
        avg.path("adapter"), [1.0], CalibrationSettings(), out_dir=tmp_path / "m"
    )
    assert m.info.get("devices") == want and m.metrics["merge_max_abs_diff"] < 1e-4, m.info
    assert json.loads((tmp_path / "m" / "result.json").read_text())["info"]["devices"] == want
    assert asked, "the base was not placed on the step's device"

    asked.clear()
    d = average.average_adapters(
        adapters[:2], AverageSettings(method="mean_deltas"), out_dir=tmp_path / "d"
    )
    assert d.info.get("devices") == want, d.info
    assert asked, "mean_deltas did not place the base on the step's device"
    assert json.loads((tmp_path / "d" / "result.json").read_text())["info"]["devices"] == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merge_runs_on_the_gpu(setup: tuple[Path, Path, list[Path]], tmp_path: Path) -> None:
    """On a GPU node the merge and its probe forward run on the GPU (the probe inputs follow the
    model there), and the merged model saved from the GPU gives the unmerged logits."""
    _, base, adapters = setup
    avg = average.average_adapters(adapters[:2], AverageSettings(), out_dir=tmp_path / "avg")
    m = average.merge_adapter(
        avg.path("adapter"), [1.0], CalibrationSettings(), out_dir=tmp_path / "m"
    )
    assert m.info["devices"] == ["cuda:0"], m.info
    assert m.metrics["merge_max_abs_diff"] < 1e-3
    x = _inputs(base)
    unmerged = _peft_logits(base, avg.path("adapter"), x)
    assert (unmerged - _full_logits(m.path("model"), x)).abs().max().item() < 1e-3
