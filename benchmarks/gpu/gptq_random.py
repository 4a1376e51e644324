"""GPTQ 8-bit linears through GPTQModel's OWN quantized-linear kernels, without a checkpoint.

For the H100 speed/memory bench of a random-init Gemma-2-9B-shaped classifier: a real GPTQ
checkpoint of that shape does not exist (random weights) and running GPTQ itself would cost
calibration time that says nothing about inference speed. So :func:`gptq_linearize` turns every
``nn.Linear`` of an already-built HF model (except the heads) into the QuantLinear class that
GPTQModel itself would use at inference, filled with VALID packed 8-bit weights: each bf16 weight is
quantized round-to-nearest per group of ``group_size`` input channels (symmetric, GPTQ's own scale
formula ``scale = 2*max|w|/maxq``, zero point ``2**(bits-1)``) and packed by GPTQModel's own
packer (``gptqmodel.utils.packing.hf_pack_layer`` -> ``pack_gpu`` on CUDA, ``pack_original`` on
CPU), labelled with the qzero flavour the kernel needs (GPTQ v2, true zero points, for the
Torch/Triton kernels; GPTQModel's v2->v1 converter for v1 kernels) and ``post_init()``-ed, as
GPTQModel's loader leaves a checkpoint's layers. The quantized model therefore reproduces the bf16
model's output up to 8-bit RTN error, which the CPU test checks (and it checks one layer's output
against the fake-quantized weight, which catches an off-by-one zero point: see the note in
:func:`gptq_linearize` on ``hf_pack_layer``'s v2 conversion).

Which kernel (``backend="auto"``)
---------------------------------
* **CUDA -> ``TritonV2Linear`` (``BACKEND.GPTQ_TRITON``)**. GPTQModel 7.6's own auto order for
  GPTQ 8-bit on CUDA is Swordfish, Machete, Marlin, then TritonV2, then Torch. Swordfish, Machete
  and Marlin are torch.ops extensions that GPTQModel **JIT-compiles with nvcc on first use**
  (validation alone triggers the build; Machete also downloads CUTLASS, impossible offline), so
  letting GPTQModel's auto run would spend minutes in nvcc or fail, and Swordfish targets
  Blackwell anyway. TritonV2 is GPTQModel's "all-around" kernel for 2/4/8 bit: a Triton kernel
  dequantizes the packed int32 weights to the activation dtype on the GPU, then torch.matmul
  (cuBLAS) does the GEMM. It needs only triton (on the device) and no compiled extension. The
  choice is still validated by GPTQModel's own ``select_quant_linear(backend=GPTQ_TRITON,
  device=cuda, pack=True)``.
* **CPU -> ``TorchLinear`` (``BACKEND.GPTQ_TORCH``)**: the only GPTQModel kernel for 8 bit on CPU
  (TorchAten/TorchFused are 4-bit only). Its ``post_init`` wraps ``dequantize_weight`` in
  ``torch.compile``; ``compile_torch_dequant=False`` (default) keeps it eager so a CPU test does
  not spend its time in inductor.
* any other string (``"gptq_torch"``, ``"torch"``, ``"triton"``, ``"marlin"``, ``"gptq_marlin"``,
  ...) is handed to GPTQModel's selector as is; ``"gptqmodel_auto"`` runs GPTQModel's full auto
  selection (may JIT-compile Marlin & co with nvcc, see above).

What the Triton kernel means for memory: TritonV2 is not a fused GEMM; each forward dequantizes
the whole weight of that layer into a temporary bf16 tensor (largest here: 14336x3584 = 98 MiB),
so peak memory = packed weights (~1 byte/param + fp16 scales) + activations + one such temp.

Import side effects handled here: importing gptqmodel sets ``PYTORCH_ALLOC_CONF=expandable_segments:
True,max_split_size_mb:256,garbage_collection_threshold:0.7`` and ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
when unset (which would change the allocator, hence peak memory, of everything measured after
it); :func:`import_gptqmodel` restores both to what they were, so the bf16 and GPTQ rows of one
bench share one allocator config. It also undoes GPTQModel's monkeypatch of triton's Autotuner
(see :func:`import_gptqmodel`) and sets ``GPTQMODEL_OFFLINE=1`` (no CUTLASS download) and
``GPTQMODEL_CPU_WORKERS=1`` unless already set. gptqmodel 7.6.0 does not need protobuf, torchao,
datasets or dill to import (see ``gptq_wheels.txt``).

torch and gptqmodel are imported lazily inside the functions.
"""

from __future__ import annotations

import os
import time
from typing import Any

_OFFLINE_ENV = {
    # Machete's CUTLASS download must never be attempted (no network on the device).
    "GPTQMODEL_OFFLINE": "1",
    # GPTQModel's device thread pool is lazy; if anything builds it, keep it small.
    "GPTQMODEL_CPU_WORKERS": "1",
}
# Variables that `import gptqmodel` sets when unset (gptqmodel/models/auto.py).
_RESTORE_ENV = ("PYTORCH_ALLOC_CONF", "CUDA_DEVICE_ORDER")

_AUTO = {"cuda": "gptq_triton", "cpu": "gptq_torch"}


# Methods of triton.runtime.autotuner.Autotuner that `import gptqmodel` replaces (triton >= 3.5)
# by its own thread-safe re-implementation (gptqmodel/utils/nogil_patcher.py).
_AUTOTUNER_PATCHED = ("__init__", "check_disk_cache", "_get_config_for_key", "run",
                      "_gptqmodel_threadsafe")
TRITON_PATCH = "n/a"  # "restored" | "kept" | "n/a" (no triton), set by import_gptqmodel()


def import_gptqmodel():
    """Import gptqmodel with offline defaults, leaving the caller's process as it was.

    * ``PYTORCH_ALLOC_CONF`` / ``CUDA_DEVICE_ORDER`` are put back to their values before the import.
    * GPTQModel's monkeypatch of triton's ``Autotuner`` (a copy of triton's ``run`` etc. made
      thread-safe for multi-threaded quantization, written against an older triton) is undone, so
      the TritonV2 dequant kernel autotunes with triton's own code; set
      ``GPTQ_RANDOM_KEEP_TRITON_PATCH=1`` to keep GPTQModel's version.
    """
    global TRITON_PATCH
    import sys

    if "gptqmodel" in sys.modules:
        return sys.modules["gptqmodel"]
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    before = {key: os.environ.get(key) for key in _RESTORE_ENV}
    try:
        from triton.runtime import autotuner as _autotuner

        saved = {name: _autotuner.Autotuner.__dict__.get(name) for name in _AUTOTUNER_PATCHED}
    except ImportError:  # no triton (CPU machines)
        _autotuner, saved = None, None
    try:
        import gptqmodel
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if saved is not None:
        if os.environ.get("GPTQ_RANDOM_KEEP_TRITON_PATCH", "0") == "1":
            TRITON_PATCH = "kept"
        else:
            cls = _autotuner.Autotuner
            for name, value in saved.items():
                if value is None:
                    if name in cls.__dict__:
                        delattr(cls, name)
                else:
                    setattr(cls, name, value)
            TRITON_PATCH = "restored"
    return gptqmodel


def select_kernel(bits: int = 8, group_size: int = 128, backend: str = "auto", device: Any = "cpu",
                  dtype: Any = None):
    """GPTQModel's QuantLinear class for ``backend`` on ``device``, validated by its selector."""
    import torch

    import_gptqmodel()
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.backend import BACKEND
    from gptqmodel.utils.importer import select_quant_linear

    device = torch.device(device)
    name = (backend or "auto").lower()
    if name == "auto":
        name = _AUTO.get(device.type, "gptq_torch")
    elif name == "gptqmodel_auto":
        name = "auto"
    return select_quant_linear(
        bits=bits, group_size=group_size, desc_act=False, sym=True,
        device=device, backend=BACKEND(name), format=FORMAT.GPTQ, quant_method=METHOD.GPTQ,
        pack=True, pack_dtype=torch.int32, dtype=dtype,
    )


def _rtn_scales(weight, bits: int, group_size: int):
    """Symmetric per-group scales [out, groups] (GPTQ's sym formula), fp32, weight's device."""
    import torch

    out_features, in_features = weight.shape
    groups = -(-in_features // group_size)
    w = weight.detach().float()
    pad = groups * group_size - in_features
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    amax = w.view(out_features, groups, group_size).abs().amax(dim=-1)
    maxq = 2**bits - 1
    scales = amax * 2.0 / maxq
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def gptq_linearize(model, bits: int = 8, group_size: int = 128, backend: str = "auto",
                   skip=("score", "lm_head", "classifier"),
                   compile_torch_dequant: bool = False) -> dict:
    """Replace every nn.Linear of ``model`` (but ``skip``) IN PLACE by GPTQModel's QuantLinear.

    ``skip`` matches the last component of a module name (or the full name). Each layer is packed
    on the device its weight lives on (CUDA: ``pack_gpu``) and the packed module is put back on
    that device; the original weight is freed. Returns ``{"backend": <QuantLinear class name>,
    "replaced": n, "bits": bits, "group_size": group_size, ...}``.
    """
    import torch
    from torch import nn

    gptqmodel = import_gptqmodel()
    from gptqmodel.quantization import FORMAT, QuantizeConfig
    from gptqmodel.utils.importer import validate_quant_linear
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
    from gptqmodel.utils.packing import hf_pack_layer

    skip = tuple(skip or ())
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear
               and name.rsplit(".", 1)[-1] not in skip and name not in skip]
    if not targets:
        raise ValueError("gptq_linearize: no nn.Linear to replace")
    first = targets[0][1].weight
    cls = select_kernel(bits, group_size, backend, first.device, first.dtype)
    qzero_format = FORMAT.GPTQ_V2 if getattr(cls, "REQUIRES_FORMAT_V2", False) else FORMAT.GPTQ
    t0 = time.perf_counter()
    replaced = 0
    with torch.no_grad():
        for name, lin in targets:
            weight = lin.weight
            device, dtype = weight.device, weight.dtype
            out_features, in_features = weight.shape
            scales = _rtn_scales(weight, bits, group_size)
            g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
            ok, err = validate_quant_linear(cls, bits=bits, group_size=group_size, desc_act=False,
                                            sym=True, pack_dtype=torch.int32, dtype=dtype,
                                            in_features=in_features, out_features=out_features,
                                            device=device)
            if not ok:
                raise err
            qlin = cls(bits=bits, group_size=group_size, desc_act=False, sym=True,
                       in_features=in_features, out_features=out_features,
                       bias=lin.bias is not None, pack_dtype=torch.int32, name=name,
                       register_buffers=False, format=FORMAT.GPTQ)
            # checkpoint_format=GPTQ: no qzero conversion inside hf_pack_layer. Its raw packers
            # store the zero points as given (true zeros = v2 content, as in GPTQModel's own
            # pack_module), but hf_pack_layer 7.6.0 labels that v1 and would add 1 to every zero
            # point when asked for v2 (measured: dequant = (q - 129) * s). So label it v2 here and
            # convert to v1 only for kernels that want v1, with GPTQModel's own converter.
            if device.type == "cuda":
                hf_pack_layer(qlin, lin, scales, None, g_idx, pack_impl="gpu", device=device,
                              checkpoint_format=FORMAT.GPTQ)
            else:
                hf_pack_layer(qlin, lin, scales.cpu(), None, g_idx, pack_impl="original",
                              checkpoint_format=FORMAT.GPTQ)
            qlin = qlin.to(device)  # pack_gpu leaves its buffers on the CPU
            qlin.qzero_format(format=2)
            if qzero_format == FORMAT.GPTQ:
                with torch.inference_mode():  # pack_gpu's buffers are inference tensors
                    convert_gptq_v2_to_v1_format_module(
                        module=qlin, quantize_config=QuantizeConfig(bits=bits))
            if qlin.bias is not None:
                qlin.bias = qlin.bias.to(dtype)
            if not compile_torch_dequant:
                qlin.optimized = True  # TorchLinear.post_init would torch.compile dequantize_weight
            qlin.post_init()
            qlin.eval()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, qlin)
            lin.weight = None  # drop the bf16 weight even if someone still holds `lin`
            lin.bias = None
            del weight, lin
            replaced += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"backend": cls.__name__, "replaced": replaced, "bits": bits, "group_size": group_size,
            "qzero_format": "v2" if qzero_format == FORMAT.GPTQ_V2 else "v1",
            "gptqmodel": getattr(gptqmodel, "__version__", "?"),
            "triton_autotuner_patch": TRITON_PATCH,
            "seconds": round(time.perf_counter() - t0, 3)}
