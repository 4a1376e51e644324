"""Compile once, not per process: a portable torch.compile cache for the TTA passes.

Why: the compiled packed TTA pass (``fast.compile_layers`` + ``arena_flex``) pays its warm-up in
every fresh process: each Slurm job, each Kubernetes pod, each GPU shard of
``predict.sharded_tta_logits``. Inductor's own disk caches (``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_<user>``) only help a later process on the same node with the same /tmp, which
a Slurm job with a private /tmp or a new pod does not have. torch's "mega-cache"
(``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``) serializes what a compile
produced (Inductor FX graphs, AOTAutograd entries, Triton kernels, autotuning results) into one
blob that another process loads into its (node-local) caches before compiling: the compile then
hits the cache. docs/gpu.md has the measured cold and warm warm-ups.

``InferSettings.compile_cache`` (or ``$ARENA_COMPILE_CACHE``) names a folder, typically on shared
storage next to the artifacts; one file per key (torch/Triton/transformers versions, the GPU, the
model config, dtype, slab shape, FP8 scope), written once, atomically (temp file + rename: no
lock on a shared file system). Only the small blob lives there; Inductor's working cache stays on
node-local disk.

Several GPU shards (:func:`open_cache` with ``rank``): rank 0 compiles and writes the file after its
first slab; the other ranks wait for that file (up to ``wait_s``) and load it, instead of all
compiling the same graphs at once on the same CPU cores. If rank 0 fails, they compile themselves.

Why written here: torch provides the serialization; choosing the key, the atomic shared-storage
write and the rank hand-off is the caller's job (no maintained library does it for HF models).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "ARENA_COMPILE_CACHE"


def cache_folder(infer: Any) -> Path | None:
    """``InferSettings.compile_cache``, else ``$ARENA_COMPILE_CACHE``, else None (no portable cache)."""
    where = getattr(infer, "compile_cache", None) or os.environ.get(ENV)
    return Path(where) if where else None


def cache_key(model: Any, infer: Any) -> str:
    """What a compiled TTA pass depends on; a change of any of it is a new file."""
    import torch
    import transformers

    from arena_assets.gpu.packing import flex_kernel_options, model_head_dim

    try:
        import triton

        triton_v = triton.__version__
    except Exception:  # noqa: BLE001 - CPU machines have no Triton
        triton_v = None
    p = next(model.parameters())
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    for k in ("_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    dev = None
    if p.device.type == "cuda":
        dev = [torch.cuda.get_device_name(p.device), list(torch.cuda.get_device_capability(p.device))]
    parts = {
        "torch": torch.__version__, "triton": triton_v, "transformers": transformers.__version__,
        "device": dev, "dtype": str(p.dtype), "config": cfg,
        "slab_tokens": getattr(infer, "slab_tokens", None), "fp8": getattr(infer, "fp8", "off"),
        "linears": sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}),
        "flex_kernel_options": flex_kernel_options(model_head_dim(model), p.device),  # baked into the graphs
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class CompileCache:
    """One process's handle on a cache file: ``loaded`` says whether it was read before compiling."""

    path: Path
    loaded: bool = False
    saved: bool = False
    record: dict[str, Any] = field(default_factory=dict)

    def save(self) -> bool:
        """Write what this process compiled, once, if the file is not there yet (atomic)."""
        if self.saved or self.path.exists():
            return False
        import torch

        got = torch.compiler.save_cache_artifacts()
        if not got or not got[0]:
            return False
        blob = got[0]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, self.path)  # another rank racing us writes an equivalent file: either wins
        self.saved = True
        self.record.update(compile_cache_saved_bytes=len(blob))
        log.info("compile cache: wrote %s (%.1f MB)", self.path, len(blob) / 1e6)
        return True


_OPENED: dict[str, CompileCache] = {}


def open_cache(model: Any, infer: Any, rank: int = 0, wait_s: float = 900.0, poll_s: float = 2.0) -> CompileCache | None:
    """Load the portable cache for this model and pass into torch's caches, before compiling.

    Call it before the first compiled forward. Once per process and key (a second call returns the
    same handle). ``rank`` > 0 waits up to ``wait_s`` for rank 0's file when there is none yet.
    Returns None when no cache folder is configured."""
    folder = cache_folder(infer)
    if folder is None:
        return None
    key = cache_key(model, infer)
    if key in _OPENED:
        return _OPENED[key]
    cc = CompileCache(folder / f"tta-{key}.bin")
    cc.record["compile_cache"] = str(cc.path)
    if rank > 0 and not cc.path.exists():
        log.info("compile cache: rank %d waits up to %.0f s for rank 0's %s", rank, wait_s, cc.path)
        t0 = time.monotonic()
        while not cc.path.exists() and time.monotonic() - t0 < wait_s:
            time.sleep(poll_s)
        cc.record["compile_cache_waited_s"] = round(time.monotonic() - t0, 1)
    if cc.path.exists():
        import torch

        t0 = time.monotonic()
        try:
            info = torch.compiler.load_cache_artifacts(cc.path.read_bytes())
            cc.loaded = info is not None  # torch logs and returns None for a file it cannot read
            if not cc.loaded:
                cc.record["compile_cache_error"] = "torch could not deserialize the file (see its warning)"
        except Exception as e:  # noqa: BLE001 - a bad or foreign file costs a compile, never the run
            log.warning("compile cache %s not loaded (%s: %s); compiling", cc.path, type(e).__name__, e)
            cc.record["compile_cache_error"] = f"{type(e).__name__}: {e}"[:300]
        cc.record["compile_cache_load_s"] = round(time.monotonic() - t0, 2)
    cc.record["compile_cache_hit"] = cc.loaded
    _OPENED[key] = cc
    return cc
