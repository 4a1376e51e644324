"""Padding-free ("packed") batches for the sequence classifiers: inference and training.

Why: on the real length distribution (mean ~700 tokens, max 2000) a padded batch wastes compute on
pad tokens and, with a fixed row count, is too small to fill an H100. Packing concatenates whole
rows into one sequence of ``slab_tokens`` tokens (batch dimension 1) and keeps them independent
with a block-diagonal causal mask; rotary positions restart at 0 in each row; each row's logits
are read at its last token (what HF's ``*ForSequenceClassification`` pooling does for a
right-padded row). Results equal the padded forward up to float rounding
(``tests/gpu/test_packing.py``), and a fixed slab shape means ``torch.compile`` compiles once.

Attention: a packed mask is block-sparse. With ``arena_flex`` (registered here with transformers'
``AttentionInterface``) it is a flex_attention ``BlockMask`` and Gemma-2's attention softcap is a
``score_mod``: the fused kernel skips the masked blocks and never materialises the L x L scores.
Why our own registration instead of transformers' ``flex_attention``: it compiles flex_attention
once with static shapes and one ``score_mod`` object per softcap value, so dynamo never re-traces
(transformers' wrapper builds a new closure per call and fell back to the unfused path after
recompiles in our H100 runs, docs/gpu.md). Eager/sdpa get an additive 4-D mask (fine for tests
and CPU; L^2 memory).

Why written here: transformers' ``DataCollatorWithFlattening`` packs for causal-LM labels, not for
one label per row; no maintained library pools a packed sequence classifier.

The packed forward runs through ``model(...)`` itself (so DDP, peft and compiled layers all see a
normal call) and reads the all-token logits of the classification head with a forward hook: HF's
classifier applies ``score`` to every token before pooling one per row.

Nothing here imports torch at module import.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from arena_assets.gpu.formatting import encoded_chunks, tta_mean

log = logging.getLogger(__name__)

ATTN_NAME = "arena_flex"
FLEX_BLOCK = 128
SLAB_TOKENS = 16384
"""Default slab: fills an H100's matrix units; also InferSettings.slab_tokens' default."""


# ---------------------------------------------------------------------------------- bin packing
def pack_bins(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[np.ndarray]:
    """Row indices grouped into bins of at most ``capacity`` tokens (best-fit decreasing).

    Best-fit decreasing leaves under 1 % empty on the arena length mix with 16k-token bins; it is
    O(n log n) plus a memmove per row (a sorted list of the open bins' free space).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a row of {int(lengths.max())} tokens does not fit a bin of {capacity}")
    order = np.argsort(-lengths, kind="stable")
    free: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
    bins: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(int(i))
        bisect.insort(free, (room - n, b))
    return [np.asarray(b, dtype=np.int64) for b in bins]


KEEP_BACK = 0.9
"""In a stream of chunks, a bin filled below this fraction waits for the next chunk's rows."""


def stream_bins(
    chunks: Iterable[tuple[np.ndarray, list[list[int]]]], capacity: int, keep_back: float = KEEP_BACK,
) -> Iterator[tuple[np.ndarray, list[list[int]]]]:
    """Bins of ``capacity`` tokens, as ``(row index, ids)``, from a stream of encoded chunks
    (``formatting.encoded_chunks``): each chunk is packed best-fit decreasing together with the rows
    of the previous chunk's bins that were filled below ``keep_back``; the last chunk keeps nothing
    back. Why: the GPU runs one chunk's slabs while the host encodes the next, and the carried rows
    keep the slabs about as full as one packing of the whole table (each slab computes ``capacity``
    tokens whether full or not)."""
    carry_idx: list[int] = []
    carry_ids: list[list[int]] = []
    it = iter(chunks)
    nxt = next(it, None)
    while nxt is not None:
        idx, ids = nxt
        nxt = next(it, None)
        idx_all = carry_idx + [int(i) for i in idx]
        ids_all = carry_ids + list(ids)
        lengths = [len(x) for x in ids_all]
        if lengths and max(lengths) > capacity:
            raise ValueError(f"slab_tokens {capacity} < longest row {max(lengths)}")
        carry_idx, carry_ids = [], []
        for b in pack_bins(lengths, capacity):
            if nxt is not None and sum(lengths[i] for i in b) < keep_back * capacity:
                carry_idx += [idx_all[i] for i in b]
                carry_ids += [ids_all[i] for i in b]
                continue
            yield np.asarray([idx_all[i] for i in b], dtype=np.int64), [ids_all[i] for i in b]


@dataclass
class Packed:
    """One packed slab: ``input_ids``/``position_ids``/``doc_ids`` of shape (1, T) and the index
    of each row's last token (``ends``, in the order of ``rows``). Pad tokens at the tail form
    their own document (id = number of rows) and are never read."""

    input_ids: Any
    position_ids: Any
    doc_ids: Any
    ends: Any
    rows: np.ndarray
    longest: int | None = None
    """The longest row's tokens, known on the host when packed here: ``packed_masks`` needs it to
    decide on a sliding-window mask, and reading it back from the GPU would stall the pipeline
    once per slab (a device-to-host sync before the next slab's masks can be built)."""

    def to(self, device: Any) -> Packed:
        nb = getattr(device, "type", str(device)) == "cuda"
        moved = (t.to(device, non_blocking=nb) for t in (self.input_ids, self.position_ids, self.doc_ids, self.ends))
        return Packed(*moved, self.rows, self.longest)


def pack(rows: Sequence[Sequence[int]], pad_id: int, total: int | None = None, pad_multiple: int = FLEX_BLOCK) -> Packed:
    """Concatenate ``rows`` into one slab of ``total`` tokens (default: their sum rounded up to
    ``pad_multiple``; a fixed ``total`` gives every slab one shape for torch.compile)."""
    import torch

    lens = [len(r) for r in rows]
    n = sum(lens)
    if total is None:
        total = -(-n // pad_multiple) * pad_multiple if pad_multiple > 1 else n
    if n > total:
        raise ValueError(f"{n} tokens do not fit a slab of {total}")
    ids = np.full(total, pad_id, dtype=np.int64)
    pos = np.zeros(total, dtype=np.int64)
    doc = np.full(total, len(rows), dtype=np.int32)
    ends = np.zeros(len(rows), dtype=np.int64)
    at = 0
    for j, r in enumerate(rows):
        k = len(r)
        ids[at : at + k] = r
        pos[at : at + k] = np.arange(k)
        doc[at : at + k] = j
        ends[j] = at + k - 1
        at += k
    pos[at:] = np.arange(total - at)
    as_t = torch.from_numpy
    return Packed(as_t(ids)[None], as_t(pos)[None], as_t(doc)[None], as_t(ends), np.arange(len(rows)), max(lens, default=0))


# ---------------------------------------------------------------------------------- attention
_COMPILED: dict[str, Any] = {}
_SCORE_MODS: dict[float | None, Any] = {}

FLEX_KERNEL_OPTIONS: dict[tuple[tuple[int, int], int], dict[str, Any]] = {
    # H100/H200 at Gemma-2's head dim 256: Inductor's default forward tile (64 x 32, 4 warps, 3 stages)
    # ran the packed TTA slab's attention 1.61x slower than this on the H200 (bench_flex.py, docs/gpu.md)
    ((9, 0), 256): {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 2, "fwd_USE_TMA": True},
}
"""flex_attention ``kernel_options`` per (CUDA capability, head dim), measured with
``benchmarks/gpu/bench_flex.py`` (docs/gpu.md); keys prefixed ``fwd_`` so the training backward
keeps Inductor's own. Missing: Inductor's default configuration."""
KERNEL_OPTIONS_ENV = "ARENA_FLEX_KERNEL_OPTIONS"
"""JSON ``kernel_options`` that override the table for every head dim (``{}``: Inductor's default);
for benchmarking configurations without editing code."""
_FLEX_OPTS: dict[int, dict[str, Any] | None] = {}
"""head dim -> the options this process uses, set by :func:`flex_kernel_options` outside the
compiled region (a plain dict read when dynamo traces :func:`arena_flex_attention`)."""


def flex_kernel_options(head_dim: int, device: Any) -> dict[str, Any] | None:
    """The ``kernel_options`` :func:`arena_flex_attention` passes for this head dim on ``device``
    (None: Inductor's default, and always on CPU); resolved once per process."""
    import torch

    if head_dim not in _FLEX_OPTS:
        opts = None
        if torch.device(device).type == "cuda":
            env = os.environ.get(KERNEL_OPTIONS_ENV)
            cap = tuple(torch.cuda.get_device_capability(device))
            opts = json.loads(env) if env is not None else FLEX_KERNEL_OPTIONS.get((cap, head_dim))  # type: ignore[arg-type]
        _FLEX_OPTS[head_dim] = dict(opts) if opts else None
    return _FLEX_OPTS[head_dim]


def _softcap_mod(softcap: float | None) -> Any:
    """One ``score_mod`` object per softcap value (a new closure per call would re-trace)."""
    if softcap not in _SCORE_MODS:
        import torch

        if softcap is None:
            _SCORE_MODS[None] = None
        else:
            cap = float(softcap)

            def softcap_mod(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
                return cap * torch.tanh(score / cap)

            _SCORE_MODS[softcap] = softcap_mod
    return _SCORE_MODS[softcap]


def _flex(device_type: str) -> Any:
    """flex_attention, compiled once (static shapes) on CUDA; the eager reference elsewhere."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda" or torch.compiler.is_compiling():
        return flex_attention  # inside a compiled layer dynamo inlines it; on CPU: tests only
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def arena_flex_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function: flex_attention with the block mask and the softcap.

    ``query`` (B, H, L, D), ``key``/``value`` (B, KV, L, D) as transformers passes them; returns
    (B, L, H, D). GQA runs natively (``enable_gqa``)."""
    if dropout:
        raise ValueError("arena_flex has no attention dropout (set attention_dropout=0)")
    from torch.nn.attention.flex_attention import BlockMask

    if attention_mask is not None and not isinstance(attention_mask, BlockMask):
        raise TypeError("arena_flex needs a flex BlockMask (use packing.packed_logits or transformers' flex mask)")
    import torch

    head_dim = int(query.shape[-1])
    if head_dim not in _FLEX_OPTS and not torch.compiler.is_compiling():  # a mask not from packed_masks
        flex_kernel_options(head_dim, query.device)
    out = _flex(query.device.type)(
        query,
        key,
        value,
        score_mod=_softcap_mod(softcap),
        block_mask=attention_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        kernel_options=_FLEX_OPTS.get(head_dim),  # resolved outside the compiled region (flex_kernel_options)
    )
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register ``arena_flex`` with transformers (attention and its mask builder); idempotent.
    Load a model with ``attn_implementation="arena_flex"`` or call ``model.set_attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    AttentionInterface.register(ATTN_NAME, arena_flex_attention)
    AttentionMaskInterface.register(ATTN_NAME, flex_attention_mask)
    return ATTN_NAME


def uses_flex(model: Any) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in (ATTN_NAME, "flex_attention")


def _config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "module"):  # DDP
        cfg = model.module.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def model_head_dim(model: Any) -> int:
    """The attention head dim of a HF (or peft/DDP-wrapped) model's text config."""
    cfg = _config(model)
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def doc_block_mask(doc: Any, mask_mod: Any, window: int | None = None, block: int = FLEX_BLOCK) -> Any:
    """flex_attention ``BlockMask`` of a packed slab's causal document mask, built from its block
    structure directly: no ``create_block_mask``.

    Why: ``torch.compile(create_block_mask)`` (what ``_compile=True`` does) spent minutes compiling
    on the H200 - over 200 s at 16384 tokens, 53 s at 8064 (the cold start of every TTA process;
    pytorch/pytorch#182060, #138514: Triton unrolls the block sort), and eager
    ``create_block_mask`` materialises the T x T mask on every slab. A packed slab's documents are
    contiguous and numbered in order (``pack``: rows 0..n-1, then the pad tail), so a
    ``block`` x ``block`` tile is decided by its first and last document ids alone: a q tile and
    an earlier kv tile share a document iff the kv tile's last id equals the q tile's first; the
    tile is full (no ``mask_mod`` needed) iff both are one and the same document; a diagonal tile
    is always partial (the causal triangle). The sliding window (``q - kv < window``) bounds the
    tile distance. Result: the same kv/full block tensors ``create_block_mask`` gives
    (``tests/gpu/test_packing.py``), from O((T/block)^2) small integer ops and no compile.
    ``doc`` must be non-decreasing (as ``pack`` makes it); T a multiple of ``block``."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    T = int(doc.shape[0])
    if T % block:
        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=doc.device, BLOCK_SIZE=block)
    n = T // block
    tiles = doc.view(n, block)
    lo, hi = tiles[:, 0], tiles[:, -1]
    i = torch.arange(n, device=doc.device)[:, None]  # q tile
    j = torch.arange(n, device=doc.device)[None, :]  # kv tile
    below = j < i
    share = (j == i) | (below & (hi[None, :] == lo[:, None]))
    one_doc = lo == hi
    full = below & one_doc[:, None] & one_doc[None, :] & (lo[None, :] == lo[:, None])
    if window is not None:
        nearest = torch.clamp((i - j - 1) * block + 1, min=0)  # smallest q - kv between the tiles
        farthest = (i - j) * block + block - 1
        share = share & (nearest < window)
        full = full & (farthest < window)
    partial = share & ~full

    def ordered(dense: Any) -> tuple[Any, Any]:
        d = dense.to(torch.int32)
        idx = torch.argsort(d, dim=-1, descending=True, stable=True)
        return d.sum(-1)[None, None].to(torch.int32).contiguous(), idx[None, None].to(torch.int32).contiguous()

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def packed_masks(model: Any, batch: Packed) -> Any:
    """The mask(s) to pass as ``attention_mask``: a dict ``{"full_attention", "sliding_attention"}``
    for models with sliding-window layers (Gemma-2), else one mask. BlockMask for flex, else an
    additive float (1, 1, T, T) mask."""
    import torch

    cfg = _config(model)
    doc = batch.doc_ids[0]
    pos = batch.position_ids[0]
    T = doc.shape[0]
    window = getattr(cfg, "sliding_window", None)
    layer_types = set(getattr(cfg, "layer_types", None) or [])
    sliding = "sliding_attention" in layer_types and window is not None
    longest = batch.longest if batch.longest is not None else int(pos.max()) + 1  # the latter syncs
    need_window = sliding and longest > int(window)  # a row longer than the window

    if uses_flex(model):

        def causal_doc(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (doc[q] == doc[kv]) & (q >= kv)

        def causal_doc_window(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (doc[q] == doc[kv]) & (q >= kv) & (q - kv < window)

        flex_kernel_options(model_head_dim(model), doc.device)  # resolved here, outside the compiled layers
        full = doc_block_mask(doc, causal_doc)
        slide = doc_block_mask(doc, causal_doc_window, window) if need_window else full
    else:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        q = torch.arange(T, device=doc.device)
        ok = (doc[:, None] == doc[None, :]) & (q[:, None] >= q[None, :])
        neg = torch.finfo(dtype).min

        def add(m: Any) -> Any:
            return torch.zeros((1, 1, T, T), dtype=dtype, device=doc.device).masked_fill(~m[None, None], neg)

        full = add(ok)
        slide = add(ok & (q[:, None] - q[None, :] < window)) if need_window else full
    return {"full_attention": full, "sliding_attention": slide} if sliding else full


def _head(model: Any) -> Any:
    """The outermost classification head module (``score``, ``classifier``)."""
    best = None
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ("score", "classifier") and (best is None or name.count(".") < best[0].count(".")):
            best = (name, mod)
    if best is None:
        raise ValueError(f"no classification head (score/classifier) in {type(model).__name__}")
    return best[1]


@contextmanager
def _capture(module: Any) -> Iterator[dict[str, Any]]:
    got: dict[str, Any] = {}

    def hook(_m: Any, _inp: Any, out: Any) -> None:
        got["out"] = out

    h = module.register_forward_hook(hook)
    try:
        yield got
    finally:
        h.remove()


def packed_logits(model: Any, batch: Packed) -> Any:
    """(n_rows, 3) logits of a packed slab (on the model's device; differentiable)."""
    masks = packed_masks(model, batch)
    with _capture(_head(model)) as got:
        model(input_ids=batch.input_ids, attention_mask=masks, position_ids=batch.position_ids, use_cache=False)
    return got["out"][0, batch.ends]


# ---------------------------------------------------------------------------------- inference
CHUNK_ROWS = 64
"""Rows encoded per chunk of a streamed packed TTA pass (after a first chunk of 16; both
orientations: about 5-6 slabs of 16k tokens on the arena length mix, so the host's encoding of a
chunk is far shorter than the GPU's work on the slab queued ahead of it)."""


def logits_of_ids_packed(
    model: Any, ids: list[list[int]], pad_id: int, slab_tokens: int = SLAB_TOKENS, desc: str = "predict-packed",
    after_first: Any = None,
) -> np.ndarray:
    """(n, 3) float64 logits for encoded rows, in packed slabs of exactly ``slab_tokens`` tokens
    (one shape: compiled layers compile once). ``slab_tokens`` bounds activation memory like a
    token budget: 16384 is plenty to fill an H100; use 4096-8192 on 16 GB cards.
    ``after_first``: called once after the first slab (the compiled graphs exist by then)."""
    return logits_of_chunks_packed(model, [(np.arange(len(ids)), ids)], len(ids), pad_id, slab_tokens, desc, after_first)


def logits_of_chunks_packed(
    model: Any, chunks: Iterable[tuple[np.ndarray, list[list[int]]]], n: int, pad_id: int,
    slab_tokens: int = SLAB_TOKENS, desc: str = "predict-packed", after_first: Any = None,
) -> np.ndarray:
    """(n, 3) float64 logits of rows arriving as ``(row index, ids)`` chunks (:func:`stream_bins`).
    Nothing here waits for the GPU until every slab is launched: a chunk is packed and its slabs
    queued while the GPU still runs the previous ones, so a generator of chunks that encodes lazily
    overlaps the host's tokenization with the GPU's work."""
    import torch
    from tqdm.auto import tqdm

    dev = next(p.device for p in model.parameters())
    done: list[tuple[np.ndarray, Any]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc, leave=False, disable=n < 64, unit="row") as bar:
            for b, rows in stream_bins(chunks, slab_tokens):
                batch = pack(rows, pad_id, total=slab_tokens)
                if dev.type == "cuda":
                    pinned = (t.pin_memory() for t in (batch.input_ids, batch.position_ids, batch.doc_ids, batch.ends))
                    batch = Packed(*pinned, batch.rows, batch.longest)
                batch = batch.to(dev)
                # the slab's logits stay on the GPU until the end: writing them into a GPU array by a
                # row-index tensor copied from pageable memory made the host wait for the GPU once per
                # slab, and the GPU then idled while the host built the next slab (7.5 % of the pass's
                # wall time in the H200 profile, docs/gpu.md)
                done.append((b, packed_logits(model, batch).float()))
                bar.update(len(b))
                if after_first is not None:  # e.g. write the compile cache once the graphs exist
                    after_first()
                    after_first = None
    finally:
        model.train(was_training)
    out = np.zeros((n, 3), dtype=np.float64)
    for b, z in done:
        out[b] = z.cpu().numpy()
    return out


def tta_logits_packed(
    model: Any,
    tokenizer: Any,
    df: Any,
    max_length: int,
    prompt_max_tokens: int,
    tta: bool = True,
    slab_tokens: int = SLAB_TOKENS,
    after_first: Any = None,
    chunk_rows: int | None = CHUNK_ROWS,
) -> np.ndarray:
    """``predict.tta_logits``'s result (mean of original and swapped-back logits) with both
    orientations packed into the same slabs, the table encoded in chunks of ``chunk_rows`` rows
    while the GPU runs the slabs already packed (``None``: encode everything first)."""
    chunks = encoded_chunks(df, tokenizer, max_length, prompt_max_tokens, tta, chunk_rows)
    n = len(df) * (2 if tta else 1)
    z = logits_of_chunks_packed(model, chunks, n, tokenizer.pad_token_id, slab_tokens, "tta-packed", after_first)
    return tta_mean(z, len(df), tta)


# ---------------------------------------------------------------------------------- training
class PackedCollator:
    """Trainer collator: a batch of rows becomes one packed slab plus per-row labels/teachers.

    ``slab_tokens`` fixes the slab length (one compiled shape; must hold a whole batch) or, when
    None, pads the sum to a multiple of ``pad_multiple`` (fewer wasted tokens, more shapes)."""

    def __init__(self, pad_id: int, slab_tokens: int | None = None, pad_multiple: int = FLEX_BLOCK) -> None:
        self.pad_id = pad_id
        self.slab_tokens = slab_tokens
        self.pad_multiple = pad_multiple

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        p = pack([it["input_ids"] for it in items], self.pad_id, self.slab_tokens, self.pad_multiple)
        batch: dict[str, Any] = {
            "input_ids": p.input_ids,
            "position_ids": p.position_ids,
            "doc_ids": p.doc_ids,
            "seq_ends": p.ends,
        }
        if "labels" in items[0]:
            batch["labels"] = torch.as_tensor(np.stack([it["labels"] for it in items]), dtype=torch.float32)
        if "teacher_logits" in items[0]:
            batch["teacher_logits"] = torch.as_tensor(np.stack([it["teacher_logits"] for it in items]), dtype=torch.float32)
        return batch


def packed_from_inputs(inputs: dict[str, Any]) -> Packed:
    """The :class:`Packed` slab inside a collated (and device-moved) Trainer batch."""
    return Packed(inputs["input_ids"], inputs["position_ids"], inputs["doc_ids"], inputs["seq_ends"], np.arange(len(inputs["seq_ends"])))
