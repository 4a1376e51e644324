"""benchmarks/gpu/gptq_random.py on CPU: GPTQModel's own 8-bit QuantLinear in a tiny Gemma-2.

gptqmodel lives in the separate quantization environment (.venv-quant, or $ARENA_QUANT_PYTHON),
so the check runs there as a subprocess; it skips when neither the current interpreter nor that
environment can import gptqmodel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks", "gpu"))
import torch
from transformers import Gemma2Config, Gemma2ForSequenceClassification
from gptq_random import gptq_linearize, _rtn_scales

alloc_before = os.environ.get("PYTORCH_ALLOC_CONF")
torch.manual_seed(0)
# one layer against its fake-quantized weight: catches a wrong zero point or packing layout
lin = torch.nn.Linear(256, 384, bias=False).to(torch.bfloat16)
torch.nn.init.normal_(lin.weight)
w = lin.weight.detach().float().clone()
s = _rtn_scales(w, 8, 128).to(torch.float16).float().repeat_interleave(128, dim=1)
w_fq = (torch.clamp(torch.round(w / s) + 128, 0, 255) - 128) * s
x = torch.randn(16, 256).to(torch.bfloat16)
one = torch.nn.Sequential(lin)
gptq_linearize(one)
with torch.no_grad():
    y = one(x).float()
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
layer = {"vs_fakequant": rel(y, x.float() @ w_fq.T), "vs_weight": rel(y, x.float() @ w.T),
         "fakequant_vs_weight": rel(x.float() @ w_fq.T, x.float() @ w.T)}

cfg = Gemma2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_labels=3,
                   pad_token_id=0, attn_implementation="eager")
model = Gemma2ForSequenceClassification(cfg).to(torch.bfloat16).eval()
ids = torch.randint(1, 1000, (4, 24))
with torch.no_grad():
    ref = model(input_ids=ids).logits.float()
info = gptq_linearize(model)
with torch.no_grad():
    out = model(input_ids=ids).logits.float()
kinds = {n: type(m).__name__ for n, m in model.named_modules()
         if isinstance(m, torch.nn.Linear) or hasattr(m, "qweight")}
print(json.dumps({"info": info, "layer": layer, "kinds": kinds,
                  "max_abs": (out - ref).abs().max().item(), "ref_max": ref.abs().max().item(),
                  "alloc_same": os.environ.get("PYTORCH_ALLOC_CONF") == alloc_before}))
"""


def _python() -> str | None:
    if importlib.util.find_spec("gptqmodel") is not None:
        return sys.executable
    for cand in (os.environ.get("ARENA_QUANT_PYTHON"), str(ROOT / ".venv-quant/bin/python")):
        if cand and Path(cand).exists():
            probe = "import importlib.util as u; raise SystemExit(u.find_spec('gptqmodel') is None)"
            ok = subprocess.run([cand, "-c", probe], check=False, capture_output=True)
            if ok.returncode == 0:
                return cand
    return None


def test_gptq_linearize_tiny_gemma2_cpu():
    py = _python()
    if py is None:
        pytest.skip("gptqmodel is not importable here nor in .venv-quant / $ARENA_QUANT_PYTHON")
    env = dict(os.environ, HF_HUB_OFFLINE="1", GPTQMODEL_CPU_WORKERS="1")
    env.pop("PYTORCH_ALLOC_CONF", None)
    proc = subprocess.run([py, "-c", SCRIPT, str(ROOT)], check=False, capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    info = res["info"]
    assert info["backend"] == "TorchLinear" and info["bits"] == 8 and info["group_size"] == 128
    assert info["replaced"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    kinds = res["kinds"]
    assert kinds.pop("score") == "Linear"
    assert set(kinds.values()) == {"TorchLinear"} and len(kinds) == 14
    layer = res["layer"]
    # GPTQModel's kernel computes x @ dequant(W): equal to the fake-quantized weight up to bf16
    # rounding; an off-by-one zero point gives ~2e-2 here
    assert layer["vs_fakequant"] < 6e-3, layer
    assert layer["vs_weight"] < 2 * layer["fakequant_vs_weight"] + 3e-3, layer
    assert res["max_abs"] < 5e-2 * res["ref_max"], res
    assert res["alloc_same"]
