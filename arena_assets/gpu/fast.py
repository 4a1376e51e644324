"""Fast paths for GPU inference (issue 9), callable from the project's inference functions.

Why a separate module: ``gpu/predict.py`` is owned by another part and was still changing when
this was written; these functions use the same encoding (:func:`formatting.encode_rows`), the same
collator and the same TTA arithmetic, so ``predict.tta_logits`` can delegate to
:func:`tta_logits_fast` on CUDA without changing any result beyond bf16 rounding.

What makes them faster than the plain ``predict_logits`` loop (measured in docs/gpu.md):

* **Token-budget batches.** Rows are sorted by length and cut into batches holding at most
  ``max_tokens`` padded tokens (and ``max_rows`` rows), instead of a fixed row count. On the real
  length distribution (mean about 700 tokens) a fixed batch of 8-16 short rows is a few thousand
  tokens: the matrix products are too small to fill an H100. A budget keeps every batch near the
  same, large, token count.
* **Both TTA orientations in one sorted pass.** The original and the A/B-swapped encodings have
  the same lengths, so they land in the same batches: half as many distinct shapes to compile
  for ``flex_attention``, and full batches at the tail.
* **Padding to a multiple of 128** (flex_attention's block size). Measured on the H100 with torch
  2.11: flex compiled for a dynamic sequence length that is NOT a multiple of the block size fails
  in Inductor (``NoValidChoicesError``), which is what the plain ``predict_logits`` loop (pad to the
  longest row) hits with ``attn_implementation="flex_attention"``. Few distinct shapes also mean
  few recompiles. (Raising dynamo's recompile limit made it slower, not faster: every new padding
  closure then recompiles ``create_block_mask`` inside the timed run; past the default limit of 8
  it runs uncompiled, which costs little once per forward.)
* **No per-batch device sync.** Logits stay on the GPU until the end (one copy back), so the host
  enqueues the next batch while the GPU works.
* Optional **FP8** (:func:`fp8_linearize`): Hopper's FP8 tensor cores through ``torch._scaled_mm``
  with per-row activation scales and per-output-channel weight scales.

Nothing here imports torch at module import (the Dagster side may import ``arena_assets.gpu``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from arena_assets.gpu.formatting import tta_in_one_pass

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- batching
def token_budget_batches(
    lengths: np.ndarray | list[int],
    max_tokens: int = 32768,
    max_rows: int = 128,
    pad_multiple: int = 128,
) -> list[np.ndarray]:
    """Indices of rows grouped into batches, longest first, each ``rows * padded_len <= max_tokens``.

    A row longer than the budget still gets a batch of its own. ``padded_len`` is the batch's
    longest row rounded up to ``pad_multiple`` (what the collator will pad to).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = int(lengths[order[start]])
        padded = -(-longest // pad_multiple) * pad_multiple if pad_multiple > 1 else longest
        k = max(1, min(max_rows, max_tokens // max(padded, 1)))
        batches.append(order[start : start + k])
        start += k
    return batches


def shard_rows(n: int, rank: int, world: int, lengths: np.ndarray | list[int] | None = None) -> np.ndarray:
    """Row indices of one rank when ``n`` rows are sharded over ``world`` GPUs.

    Without ``lengths``: strided (every rank gets about the same length mix). With ``lengths``
    (tokens or characters per row): longest-first to the least-loaded rank, so the ranks' token
    totals, hence their finishing times, match. Measured on 2 GPUs, strided shards of 256 rows
    finished 5 % apart, which alone cost 0.03 of scaling (docs/gpu.md).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    if lengths is None:
        return np.arange(rank, n, world)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} rows")
    load = np.zeros(world, dtype=np.int64)
    owner = np.empty(n, dtype=np.int64)
    for i in np.argsort(-lengths, kind="stable"):
        r = int(np.argmin(load))
        owner[i] = r
        load[r] += lengths[i]
    return np.flatnonzero(owner == rank)


# ---------------------------------------------------------------------------------- compile
def allow_recompiles(limit: int = 64) -> None:
    """Raise dynamo's per-function recompile limit (default 8). transformers re-traces
    ``create_block_mask`` for each new padding-mask closure; past the limit dynamo silently runs it
    (and flex_attention) uncompiled, which materialises full masks/scores."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name) and getattr(dynamo.config, name) < limit:
            setattr(dynamo.config, name, limit)


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of decoder layers of a HF (or peft-wrapped) sequence classifier."""
    m = model
    for attr in ("base_model", "model"):
        while hasattr(m, attr) and not hasattr(m, "layers"):
            m = getattr(m, attr)
    if not hasattr(m, "layers"):
        raise ValueError(f"no decoder layers found in {type(model).__name__}")
    return m.layers


def compile_layers(model: Any, dynamic: bool = True) -> int:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``; state-dict keys are
    unchanged). Why per layer: all layers share one graph (two for Gemma-2's alternating
    sliding/global layers), so compile time is that of one layer, while Inductor fuses the
    elementwise work (fp32 RMSNorms, GELU, rotary, softcap, residual adds) that otherwise costs
    extra passes over the activations. flex_attention is traced inline into the layer graph."""
    allow_recompiles()
    layers = decoder_layers(model)
    if getattr(model, "_arena_compiled", None) == dynamic:
        return len(layers)
    for layer in layers:
        layer.compile(dynamic=dynamic)
    model._arena_compiled = dynamic
    log.info("compile_layers: %d decoder layers compiled (dynamic=%s)", len(layers), dynamic)
    return len(layers)


def uncompile_layers(model: Any) -> None:
    """Undo :func:`compile_layers` (plain modules again; the next compile_layers compiles anew)."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
    model._arena_compiled = None


# ---------------------------------------------------------------------------------- inference
def _pad_batch(rows: list[list[int]], pad_id: int, pad_multiple: int) -> tuple[Any, Any]:
    import torch

    n = max(len(x) for x in rows)
    if pad_multiple > 1:
        n = -(-n // pad_multiple) * pad_multiple
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, x in enumerate(rows):
        ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


def auto_pad_multiple(model: Any) -> int:
    """128 for flex_attention (its block size: dynamic shapes that are not a multiple fail to
    compile), 16 otherwise (less padding; tensor-core friendly)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return 128 if impl == "flex_attention" else 16


def logits_of_ids(
    model: Any,
    ids: list[list[int]],
    pad_id: int,
    max_tokens: int = 32768,
    max_rows: int = 512,
    pad_multiple: int | None = None,
    desc: str = "predict-fast",
) -> np.ndarray:
    """(n, 3) float64 logits for already-encoded rows, in token-budget batches (see module doc).

    ``max_tokens`` bounds one batch's padded tokens, hence its activation memory: 65536 measured
    best on an 80 GB H100 (44-60 GiB peak for the 9B student); keep 32768 or less on smaller cards.
    ``pad_multiple`` None picks :func:`auto_pad_multiple`.
    """
    import torch
    from tqdm.auto import tqdm

    if pad_multiple is None:
        pad_multiple = auto_pad_multiple(model)
    n = len(ids)
    batches = token_budget_batches([len(x) for x in ids], max_tokens, max_rows, pad_multiple)
    dev = next(p.device for p in model.parameters())
    cuda = dev.type == "cuda"
    out = torch.empty((n, 3), dtype=torch.float32, device=dev)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 8):
                x, m = _pad_batch([ids[i] for i in idx], pad_id, pad_multiple)
                if cuda:
                    x, m = x.pin_memory().to(dev, non_blocking=True), m.pin_memory().to(dev, non_blocking=True)
                logits = model(input_ids=x, attention_mask=m).logits
                out[torch.as_tensor(idx, device=dev)] = logits.float()
    finally:
        model.train(was_training)
    return out.cpu().numpy().astype(np.float64)


def tta_logits_fast(
    model: Any,
    tokenizer: Any,
    df: Any,
    max_length: int,
    prompt_max_tokens: int,
    tta: bool = True,
    max_tokens: int = 32768,
    max_rows: int = 512,
    pad_multiple: int | None = None,
) -> np.ndarray:
    """Same result as ``predict.tta_logits`` (mean of original and swapped-back logits) in one
    length-sorted, token-budget pass over both orientations."""
    return tta_in_one_pass(
        df, tokenizer, max_length, prompt_max_tokens, tta,
        lambda ids: logits_of_ids(model, ids, tokenizer.pad_token_id, max_tokens, max_rows, pad_multiple, desc="tta-fast"),
    )


# ---------------------------------------------------------------------------------- FP8
def _fp8_linear_cls() -> Any:
    import torch

    class Fp8Linear(torch.nn.Module):
        """y = x W^T on FP8 tensor cores (e4m3), per-row activation and per-channel weight scales.

        Why per-row/per-channel: one scale for a whole activation tensor lets a few outlier tokens
        crush the rest into FP8's 3 mantissa bits' worst range; rowwise scales are what
        ``torch._scaled_mm`` accepts on Hopper at no extra matmul cost.
        """

        FP8_MAX = 448.0

        def __init__(self, linear: torch.nn.Linear, granularity: str = "row") -> None:
            super().__init__()
            if granularity not in ("row", "tensor"):
                raise ValueError(f"granularity must be 'row' or 'tensor', not {granularity!r}")
            self.granularity = granularity
            w = linear.weight.detach()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            if granularity == "row":
                amax = w.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)  # (N, 1)
            else:
                amax = w.abs().amax().float().clamp_min(1e-12).reshape(1, 1)
            scale = amax / self.FP8_MAX
            wq = (w.float() / scale).clamp(-self.FP8_MAX, self.FP8_MAX).to(torch.float8_e4m3fn)
            self.register_buffer("weight_fp8", wq)  # (N, K) row-major; .t() is the column-major B
            ws = scale.reshape(1, -1).contiguous() if granularity == "row" else scale.reshape(()).contiguous()
            self.register_buffer("weight_scale", ws)  # (1, N) or a scalar
            self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
            self.out_dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if self.granularity == "row":
                amax = x2.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
            else:  # one scale: cuBLAS's FP8 GEMM (rowwise scales take a CUTLASS kernel)
                amax = x2.abs().amax().float().clamp_min(1e-12)
            xs = amax / self.FP8_MAX
            xq = (x2.float() / xs).clamp(-self.FP8_MAX, self.FP8_MAX).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(
                xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale, bias=self.bias, out_dtype=self.out_dtype
            )
            return y.reshape(*shape[:-1], self.out_features)

    return Fp8Linear


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def fp8_linearize(
    model: Any,
    skip: tuple[str, ...] = ("score", "lm_head", "classifier"),
    granularity: str = "row",
    scope: str = "all",
) -> int:
    """Replace every ``nn.Linear`` (except the heads in ``skip``) by an FP8 version, in place.

    ``granularity``: ``row`` (per-token activation, per-channel weight scales; more accurate) or
    ``tensor`` (one dynamic scale per activation tensor and one per weight).
    ``scope``: ``all`` linears, or ``mlp`` only (attention projections stay bf16). Why ``mlp``: on
    the fidelity benchmark's trained student, FP8 attention projections cause most of the
    probability error (max 0.019-0.021 vs bf16 with ``all``, 0.003 with ``mlp``; docs/gpu.md),
    while the MLP holds 78 % of the 9B's linear FLOPs.

    Returns the number replaced. Needs a GPU with FP8 tensor cores (compute capability >= 8.9).
    """
    import torch

    if scope not in ("all", "mlp"):
        raise ValueError(f"scope must be 'all' or 'mlp', not {scope!r}")
    if scope == "mlp":
        skip = (*skip, *ATTENTION_PROJECTIONS)
    cls = _fp8_linear_cls()
    todo = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not any(s in name.split(".") for s in skip)
    ]
    for name, mod in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls(mod, granularity))
        del mod
    log.info("fp8_linearize: %d linear layers now FP8 (e4m3, %s scales)", len(todo), granularity)
    return len(todo)
