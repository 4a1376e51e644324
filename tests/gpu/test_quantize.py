"""Step 7 on a tiny TRAINED Gemma-2 classifier (CPU): GPTQ in .venv-quant, bnb int8 fallback.

The model is trained for a few seconds on a synthetic preference task (A/B responses carry
"good"/"bad" words; noisy labels), so its predictions are confident and its validation log-loss
is far below ln 3: a quantization that damaged the body would show in the log-loss.

The GPTQ path runs in the separate quantization environment (GPTQModel pins protobuf>=7.34, the
Dagster venv has protobuf<7) through ``python -m arena_assets.gpu.quantize``. Those tests skip when
.venv-quant is absent, except under ``CI=true`` where they must run (the CI script creates it
with scripts/setup-quant-env.sh).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")

from arena_assets.core.results import StepResult
from arena_assets.core.settings import FormatSettings, QuantSettings
from arena_assets.gpu import quantize as q

QPY = q.quant_python()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
needs_quant_env = pytest.mark.skipif(
    (QPY is None or not Path(QPY).exists()) and not IN_CI,
    reason="no GPTQ environment (.venv-quant or $ARENA_QUANT_PYTHON): run `bash scripts/setup-quant-env.sh`",
)
FILLER = [f"w{i}" for i in range(30)]
LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]
# GPTQ group size for a hidden-64 model (the 1st place's 128 needs in_features >= 128)
QCFG = {"bits": 8, "group_size": 32, "n_calibration": 32, "calibration_max_length": 64}


def make_rows(n: int, seed: int) -> pd.DataFrame:
    """Rows whose winner follows the count of good/bad words per response, with 15% label noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        resp, score = {}, {}
        for side in "ab":
            k_good, k_bad = rng.integers(0, 3, size=2)
            words = (
                [f"{side}_good"] * k_good + [f"{side}_bad"] * k_bad + list(rng.choice(FILLER, 4))
            )
            rng.shuffle(words)
            resp[side], score[side] = " ".join(words), int(k_good - k_bad)
        win = 0 if score["a"] > score["b"] else 1 if score["b"] > score["a"] else 2
        if rng.random() < 0.15:
            win = int(rng.integers(0, 3))
        y = [0.0, 0.0, 0.0]
        y[win] = 1.0
        rows.append(
            {
                "id": f"r{seed}_{i}",
                "prompt": [" ".join(rng.choice(FILLER, 3))],
                "response_a": [resp["a"]],
                "response_b": [resp["b"]],
                "model_a": "m1",
                "model_b": "m2",
                **dict(zip(LABELS, y)),
            }
        )
    return pd.DataFrame(rows)


def row_texts(df: pd.DataFrame) -> list[str]:
    return [f"{p[0]} {a[0]} {b[0]}" for p, a, b in zip(df.prompt, df.response_a, df.response_b)]


def log_loss_of(model, tok, df: pd.DataFrame) -> float:
    from sklearn.metrics import log_loss

    enc = tok(row_texts(df), return_tensors="pt", padding=True)
    with torch.no_grad():
        p = model(**enc).logits.float().softmax(-1).numpy()
    return float(log_loss(df[LABELS].to_numpy().argmax(1), p, labels=[0, 1, 2]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(merged model dir, train parquet, valid parquet, fp valid log-loss)."""
    from tiny_models import gemma2_classifier, word_tokenizer

    root = tmp_path_factory.mktemp("quant")
    train, valid = make_rows(600, 1), make_rows(200, 2)
    vocab = [*FILLER, *(f"{s}_{w}" for s in "ab" for w in ("good", "bad"))]
    tok = word_tokenizer(vocab, padding_side="right", split_punctuation=False)
    model = gemma2_classifier(tok)
    enc = tok(row_texts(train), return_tensors="pt", padding=True)
    y = torch.tensor(train[LABELS].to_numpy().argmax(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(0, len(y), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=enc.input_ids[idx], attention_mask=enc.attention_mask[idx]).logits,
            y[idx],
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    fp_ll = log_loss_of(model, tok, valid)
    assert fp_ll < math.log(3) - 0.15, (
        f"the fixture model did not learn (valid log-loss {fp_ll:.3f})"
    )
    mdir = root / "merged"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    train.to_parquet(root / "train.parquet")
    valid.to_parquet(root / "valid.parquet")
    return mdir, root / "train.parquet", root / "valid.parquet", fp_ll


def _in_quant_env(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run ``QPY args`` (the GPTQ environment's interpreter) offline; fail with its output if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    proc = subprocess.run([QPY, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _seen_line(proc: subprocess.CompletedProcess[str]) -> list[dict[str, str]]:
    """The kernel choices a driver script printed as ``SEEN [...]``."""
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("SEEN "))[5:])


def _score_is_original(qdir: Path, fp_dir: Path) -> None:
    from safetensors.torch import load_file

    fp = load_file(str(fp_dir / "model.safetensors"))["score.weight"]
    qsd = load_file(str(qdir / "model.safetensors"))
    assert "score.weight" in qsd and not any(
        k.startswith("score.") and k != "score.weight" for k in qsd
    ), f"score head saved as quantized: {[k for k in qsd if k.startswith('score')]}"
    torch.testing.assert_close(qsd["score.weight"].float(), fp.float(), rtol=0, atol=0)


def test_quant_python_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(q.QUANT_PYTHON_ENV, "/opt/x/bin/python")
    assert q.quant_python(QuantSettings(python="/explicit/python")) == "/explicit/python"
    assert q.quant_python(QuantSettings()) == "/opt/x/bin/python"
    monkeypatch.delenv(q.QUANT_PYTHON_ENV)
    got = q.quant_python(QuantSettings())
    assert got == (
        str(q.DEFAULT_QUANT_VENV / "bin" / "python")
        if (q.DEFAULT_QUANT_VENV / "bin" / "python").exists()
        else None
    )


def test_gptq_shape_check(trained):
    """GPTQModel packs 32-bit words: a model with a 16-wide KV projection is refused up front."""
    from transformers import (
        AutoModelForSequenceClassification,
        Gemma2Config,
        Gemma2ForSequenceClassification,
    )

    ok = AutoModelForSequenceClassification.from_pretrained(trained[0])
    assert q.gptq_shape_problem(ok, "score") is None
    small = Gemma2ForSequenceClassification(
        Gemma2Config(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            num_labels=3,
            pad_token_id=0,
        )
    )
    msg = q.gptq_shape_problem(small, "score")
    assert msg is not None and "k_proj (32x16)" in msg


def test_bnb8_fallback_when_gptq_unavailable(trained, tmp_path, monkeypatch):
    """In the Dagster venv gptqmodel is absent (or made absent): GPTQ is attempted, fails with the
    reason recorded, and bitsandbytes int8 is taken with the head kept fp."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    mdir, train_pq, valid_pq, fp_ll = trained
    if q.gptq_unavailable_reason() is None:  # e.g. running this file inside .venv-quant
        monkeypatch.setattr(
            q, "gptq_unavailable_reason", lambda: "gptqmodel made unavailable by the test"
        )
    res = q.quantize(
        mdir, QuantSettings(**QCFG), FormatSettings(), train_pq, out_dir=tmp_path / "v"
    )
    assert isinstance(res, StepResult) and res.info["method"] == "bnb8"
    qj = json.loads(res.path("quantization").read_text())
    assert qj["method"] == "bnb8"
    assert [a["method"] for a in qj["attempts"]] == ["gptq", "bnb8"]
    assert qj["attempts"][0]["ok"] is False and qj["attempts"][1]["ok"] is True
    assert "gptq failed" in qj["fallback_reason"] and (
        "not importable" in qj["fallback_reason"] or "made unavailable" in qj["fallback_reason"]
    )
    assert qj["head_unchanged"] and qj["head_type"] == "torch.nn.Linear"
    assert qj["quantized_linear_modules"] > 0
    assert qj["sizes"]["output_bytes"] < qj["sizes"]["input_bytes"]
    qdir = res.path("model")
    assert (qdir / "tokenizer.json").exists()
    assert (
        json.loads((qdir / "config.json").read_text())["quantization_config"]["load_in_8bit"]
        is True
    )
    _score_is_original(qdir, mdir)
    # reload as inference would; the head is a plain Linear, the body int8; log-loss within 0.01
    qm = AutoModelForSequenceClassification.from_pretrained(
        qdir, device_map={"": "cpu"}, attn_implementation="eager"
    ).eval()
    assert type(qm.score) is torch.nn.Linear
    assert type(qm.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    q_ll = log_loss_of(qm, AutoTokenizer.from_pretrained(qdir), pd.read_parquet(valid_pq))
    assert abs(q_ll - fp_ll) < 0.01, (q_ll, fp_ll)


def test_forced_fallback_and_last_resort(trained, tmp_path):
    """Settings decide: without gptq in methods bnb8 is taken with that reason; `none` copies."""
    mdir, train_pq, _, _ = trained
    pytest.importorskip("bitsandbytes")
    res = q.quantize(
        mdir,
        QuantSettings(methods=["bnb8"], **QCFG),
        FormatSettings(),
        train_pq,
        out_dir=tmp_path / "a",
    )
    qj = json.loads(res.path("quantization").read_text())
    assert qj["method"] == "bnb8" and "not in QuantSettings.methods" in qj["fallback_reason"]
    res = q.quantize(
        mdir,
        QuantSettings(methods=["none"], **QCFG),
        FormatSettings(),
        train_pq,
        out_dir=tmp_path / "b",
    )
    qj = json.loads(res.path("quantization").read_text())
    assert qj["method"] == "none" and qj["max_abs_logit_diff"] == 0.0
    _score_is_original(res.path("model"), mdir)


def test_every_method_failing_leaves_no_output(trained, tmp_path, monkeypatch):
    mdir, train_pq, _, _ = trained
    monkeypatch.setattr(
        q, "gptq_unavailable_reason", lambda: "gptqmodel made unavailable by the test"
    )
    with pytest.raises(RuntimeError, match="every quantization method failed.*gptq"):
        q.quantize(
            mdir,
            QuantSettings(methods=["gptq"], **QCFG),
            FormatSettings(),
            train_pq,
            out_dir=tmp_path / "x",
        )
    assert not (tmp_path / "x").exists()


@needs_quant_env
def test_gptq_in_quant_env(trained, tmp_path):
    """The GPTQ path, run as the compute resource runs it: the quant env's python, the module's
    entry point. GPTQ is taken (no fallback), the head stays fp and the log-loss moves < 0.01."""
    assert QPY is not None and Path(QPY).exists(), f"CI must provide the GPTQ environment ({QPY})"
    mdir, train_pq, valid_pq, fp_ll = trained
    out = tmp_path / "v"
    _in_quant_env(
        ["-m", "arena_assets.gpu.quantize", str(mdir), str(out), "--calibration-table", str(train_pq),
         "--settings", QuantSettings(**QCFG).model_dump_json()],
        tmp_path,
    )
    res = StepResult.read(out)
    qj = json.loads(res.path("quantization").read_text())
    assert qj["method"] == "gptq" and qj["fallback_reason"] is None, qj
    assert qj["attempts"] == [
        {"method": "gptq", "ok": True, "seconds": qj["attempts"][0]["seconds"]}
    ]
    assert qj["head_unchanged"] and qj["quantized_linear_modules"] > 0 and qj["python"] == QPY
    assert qj["calibration"]["rows"] == QCFG["n_calibration"]
    qdir = res.path("model")
    cfg = json.loads((qdir / "config.json").read_text())["quantization_config"]
    assert (
        cfg["bits"] == 8 and cfg.get("dataset") is None
    )  # no training rows shipped in config.json
    _score_is_original(qdir, mdir)
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
    # inference on the GPTQ model happens in the quant env too
    script = textwrap.dedent(f"""
        import json, torch, pandas as pd
        from sklearn.metrics import log_loss
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        m = AutoModelForSequenceClassification.from_pretrained({str(qdir)!r}, device_map={{"": "cpu"}},
                                                               attn_implementation="eager").eval()
        tok = AutoTokenizer.from_pretrained({str(qdir)!r})
        df = pd.read_parquet({str(valid_pq)!r})
        texts = [f"{{p[0]}} {{a[0]}} {{b[0]}}" for p, a, b in zip(df.prompt, df.response_a, df.response_b)]
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            p = m(**enc).logits.float().softmax(-1).numpy()
        y = df[{LABELS!r}].to_numpy().argmax(1)
        print(json.dumps({{"ll": float(log_loss(y, p, labels=[0, 1, 2])), "score": type(m.score).__name__,
                          "body": type(m.model.layers[0].mlp.down_proj).__name__}}))
    """)
    proc = _in_quant_env(["-c", script], tmp_path, timeout=600)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["score"] == "Linear" and got["body"] != "Linear", got
    assert abs(got["ll"] - fp_ll) < 0.01, (got, fp_ll)


@needs_quant_env
def test_gptq_backend_setting_picks_the_kernel(
    trained: tuple[Path, Path, Path, float], tmp_path: Path
) -> None:
    """``QuantSettings.gptq_backend`` reaches GPTQModel (issue 15: ``auto`` may pick a CUDA kernel
    compiled with nvcc at first use on Hopper; ``gptq_torch`` needs no compiler). The quantize
    step runs as the compute resource runs it (the quant env, the module's ``main``), with the
    optimum quantizer's kernel choice recorded: the backend it was given and the quantized
    linear class it built the body from (on CPU ``auto`` picks the same torch kernel, so the
    backend passed is what tells the setting arrived).

    Then the saved model is loaded the way TTA loads it (``models.load_classifier``) and must get
    the same kernel: transformers rebuilds the saved ``quantization_config`` from optimum's
    ``GPTQQuantizer.to_dict``, which has no ``backend`` key, so the model used to say ``auto``
    and on the H200 TTA loaded it with Marlin, which compiles a CUDA extension first (the step
    now writes the backend into the saved quantization config)."""
    assert QPY is not None and Path(QPY).exists(), f"CI must provide the GPTQ environment ({QPY})"
    mdir, train_pq, _, _ = trained
    out = tmp_path / "v"
    settings = QuantSettings(**QCFG, gptq_backend="gptq_torch").model_dump_json()
    driver = textwrap.dedent(f"""
        import json
        from optimum.gptq.quantizer import GPTQQuantizer
        from arena_assets.gpu.quantize import main

        seen = []
        select = GPTQQuantizer.select_quant_linear

        def spy(self, *args, **kwargs):
            got = select(self, *args, **kwargs)
            seen.append({{"backend": str(getattr(self.backend, "value", self.backend)),
                          "kernel": self.quant_linear.__name__}})
            return got

        GPTQQuantizer.select_quant_linear = spy
        rc = main([{str(mdir)!r}, {str(out)!r}, "--calibration-table", {str(train_pq)!r},
                   "--settings", {settings!r}])
        print("SEEN " + json.dumps(seen))
        raise SystemExit(rc)
    """)
    proc = _in_quant_env(["-c", driver], tmp_path)
    res = StepResult.read(out)
    qj = json.loads(res.path("quantization").read_text())
    assert qj["method"] == "gptq" and qj["fallback_reason"] is None, qj
    assert qj["head_unchanged"] and qj["quantized_linear_modules"] > 0
    seen = _seen_line(proc)
    assert seen, "the optimum quantizer never selected a kernel"
    assert {s["backend"] for s in seen} == {"gptq_torch"}, seen
    assert {s["kernel"] for s in seen} == {"TorchLinear"}, seen  # GPTQModel 7.x's gptq_torch kernel
    qdir = res.path("model")
    assert json.loads((qdir / "config.json").read_text())["quantization_config"]["backend"] == "gptq_torch"
    loader = driver.split("GPTQQuantizer.select_quant_linear = spy")[0] + textwrap.dedent(f"""
        GPTQQuantizer.select_quant_linear = spy
        from arena_assets.gpu.models import load_classifier
        load_classifier({str(qdir)!r})
        print("SEEN " + json.dumps(seen))
    """)
    seen = _seen_line(_in_quant_env(["-c", loader], tmp_path, timeout=600))
    assert seen and {s["backend"] for s in seen} == {"gptq_torch"}, seen  # the saved kernel, not auto


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
