"""The torch reference attention backend: the oracle for the Triton kernels, and the CPU path.

Decode on CPU runs the native kernel (`cpu_decode.cpp`, built on first use) when it can be built, else
`decode_reference`, which is also the oracle for that kernel. `rope_store_attention_op` gives the model the native
op that also does the rotary embedding and the KV store of a step in the same call (for steps with prompt tokens:
`_PromptStep`).

kv_layer is one layer's `[2, num_blocks, block_size, num_kv_heads, head_dim]` view of the KV cache (strided: K and
V of a page are adjacent in memory, see engine/kv_layout.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_kernels import native_ops, paged_decode_op
from .metadata import AttentionMetadata


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] written to their slots (kv_layer may be any strided view)."""
    block_size = kv_layer.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    kv_layer[0].index_put_((blocks, offsets), k.to(kv_layer.dtype))
    kv_layer[1].index_put_((blocks, offsets), v.to(kv_layer.dtype))


def _gather(kv_layer: torch.Tensor, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = kv_layer.shape[2]
    nblocks = (length + block_size - 1) // block_size
    pages = kv_layer[:, block_table[:nblocks].long()]          # [2, n, bs, H, D]
    pages = pages.flatten(1, 2)[:, :length]                      # [2, length, H, D]
    return pages[0], pages[1]


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]."""
    if meta.is_decode_only:
        return _decode(q, kv_layer, meta, scale)
    out = torch.empty_like(q)
    start = 0
    for s, (qlen, clen) in enumerate(zip(meta.query_lens, meta.context_lens)):
        out[start:start + qlen] = _chunk_attention(q[start:start + qlen], kv_layer, meta, s, scale)
        start += qlen
    return out


def _chunk_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, s: int,
                     scale: float) -> torch.Tensor:
    """Sequence s's new tokens q [qlen, H, D] over its context, by SDPA on its gathered pages."""
    qlen, clen = meta.query_lens[s], meta.context_lens[s]
    # 4-D [1, H, len, D] inputs: on CPU only those reach SDPA's flash kernel (3-D ones take the math path, which
    # materializes the [H, q, c] scores: 9x slower per layer for a 512-token bfloat16 prompt, 23x at 2048)
    qs = q.transpose(0, 1).unsqueeze(0)                                            # [1, H, q, D]
    k, v = _gather(kv_layer, meta.block_tables[s], clen)
    k = k.transpose(0, 1).unsqueeze(0).to(q.dtype)                                 # [1, Hkv, c, D]
    v = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
    if qlen == clen:
        o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:      # a later chunk: every cached token is visible, the chunk's own are causal
        mask = meta.per_step(f"torch_prefill_mask:{s}:{q.dtype}", lambda: _chunk_mask(qlen, clen, q.dtype, q.device))
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def _chunk_mask(qlen: int, clen: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [q, c] mask of a chunk's last `qlen` of `clen` positions: built once per step, not per layer
    (a float mask also saves SDPA converting a boolean one on every call)."""
    qpos = torch.arange(clen - qlen, clen, device=device).unsqueeze(1)
    hidden = torch.arange(clen, device=device).unsqueeze(0) > qpos
    return torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))


def _decode(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """All sequences have one new token. On CPU the native kernel (`cpu_decode.cpp`) reads K and V straight from
    the pages, with no gather and no padding to the longest context: 1.5-4x faster than `decode_reference`."""
    if kv_layer.device.type == "cpu" and (op := _native_decode(q.dtype, q.shape[1], kv_layer)) is not None:
        return op(q, kv_layer, meta.block_tables, meta.context_lens_t, scale)
    return decode_reference(q, kv_layer, meta, scale)


def rope_store_attention_op(dtype: torch.dtype, num_heads: int, kv_layer: torch.Tensor, meta: AttentionMetadata):
    """The native op that does a CPU step's rotary embedding, KV store and attention in one call, when this step
    can use it, else None (another device or dtype, no native build): the caller then rotates, stores and attends
    with the separate functions. A decode step gets `rope_store_decode` (cpu_decode.cpp); a step with prompt
    tokens gets a `_PromptStep`. Their signature:

        (qkv [T, (H + 2 Hkv) * D] contiguous, cos [T, 1, D], signed_sin [T, 1, D] (in qkv's dtype), kv_layer,
         slot_mapping, block_tables, context_lens_t, num_heads, scale) -> [T, H * D]
    """
    if kv_layer.device.type != "cpu" or _native_decode(dtype, num_heads, kv_layer) is None:
        return None
    ops = native_ops()
    if meta.is_decode_only:
        return ops.rope_store_decode.default
    return meta.per_step(f"prompt_step:{dtype}", lambda: _PromptStep(meta, ops))


# A chunk of at most ROW_TOKENS new tokens over at most ROW_PAIRS (query, context token) pairs attends through
# the native decode kernel, one row per token; other chunks by SDPA, whose gather and call cost a fixed ~0.2 ms
# per layer but less per pair. bfloat16, beside 8 decodes, contexts up to 512: a 16-token chunk's step spent 7.7
# ms in attention as rows against 10.9 by SDPA; a 64-token chunk's 19.4 against 13.1. A 4096-token prompt in
# 16-token chunks: median step 85.0 ms with every chunk as rows, 81.5 with the pair limit.
ROW_TOKENS = 16
ROW_PAIRS = 16384


class _PromptStep:
    """A CPU step with prompt chunks, possibly beside decodes: the rotary embedding and KV store of every new token
    in one native call (`rope_store`, cpu_rope.cpp); then the decodes and the tokens of short chunks (within
    ROW_TOKENS and ROW_PAIRS) attend in one call of the native decode kernel, as in a decode-only step, and every
    other chunk by SDPA.

    Before, such a step ran the decodes beside it through SDPA one sequence at a time, with the rotary and store
    as separate ATen ops: a bfloat16 step of 8 decodes and a 16-token chunk took 65-67 ms (now 45) against 31-34
    ms for the 8 decodes alone. A decode now rounds the same whether or not a prompt shares its step.
    """

    __slots__ = ("meta", "rope_store", "decode", "rows", "tables", "lens", "chunks")

    def __init__(self, meta: AttentionMetadata, ops) -> None:
        self.meta, self.rope_store, self.decode = meta, ops.rope_store.default, ops.paged_decode.default
        starts = [0]
        for qlen in meta.query_lens:
            starts.append(starts[-1] + qlen)
        # every token of a decode or of a short chunk is a row of the native decode kernel: its own query over the
        # context up to itself
        as_rows = [qlen == 1 or (qlen <= ROW_TOKENS and qlen * clen <= ROW_PAIRS)
                   for qlen, clen in zip(meta.query_lens, meta.context_lens)]
        seqs = [s for s, rows in enumerate(as_rows) if rows]
        self.chunks = [(s, starts[s], qlen) for s, qlen in enumerate(meta.query_lens) if not as_rows[s]]
        self.rows = self.tables = self.lens = None
        if seqs:
            tokens = [t for s in seqs for t in range(starts[s], starts[s + 1])]
            contiguous = tokens == list(range(tokens[0], tokens[0] + len(tokens)))
            self.rows = slice(tokens[0], tokens[-1] + 1) if contiguous else torch.tensor(tokens)
            which = torch.tensor([s for s in seqs for _ in range(meta.query_lens[s])])
            self.tables = meta.block_tables.index_select(0, which)
            self.lens = torch.tensor([meta.context_lens[s] - meta.query_lens[s] + 1 + i for s in seqs
                                      for i in range(meta.query_lens[s])], dtype=torch.int32)

    def __call__(self, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, kv_layer: torch.Tensor,
                 slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 num_heads: int, scale: float) -> torch.Tensor:
        q = self.rope_store(qkv, cos, signed_sin, kv_layer, slot_mapping, num_heads)       # [T, H, D]
        out = torch.empty_like(q)
        if self.rows is not None:
            out[self.rows] = self.decode(q[self.rows], kv_layer, self.tables, self.lens, scale, True)
        for s, start, qlen in self.chunks:
            out[start:start + qlen] = _chunk_attention(q[start:start + qlen], kv_layer, self.meta, s, scale)
        return out.view(q.shape[0], -1)


def decode_reference(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decode attention in torch ops: one batched, masked SDPA over the gathered pages (any device and dtype).

    What is the same in every layer is built once per step (`_DecodePlan`). Per layer there is one index_select
    that copies the batch's K and V pages into a buffer reused by every layer (fresh buffers of tens of MB are
    page-faulted in on each use), and one SDPA call in which each KV head's query heads form the query length
    ([B, Hkv, q_per_kv, D]), so K and V are read once per KV head instead of being repeated for each query head.
    """
    plan = meta.per_step(f"torch_decode:{q.dtype}", lambda: _DecodePlan(meta, kv_layer, q.dtype))
    kv_heads, head_dim = kv_layer.shape[-2:]
    pages = torch.index_select(kv_layer, 1, plan.block_ids, out=plan.pages)
    k, v = pages.view(2, meta.num_seqs, -1, kv_heads, head_dim).transpose(2, 3).to(q.dtype)   # [B, Hkv, L, D]
    o = F.scaled_dot_product_attention(q.unflatten(1, (kv_heads, -1)), k, v, attn_mask=plan.bias, scale=scale)
    return o.reshape(meta.num_seqs, -1, head_dim)


def _native_decode(dtype: torch.dtype, num_heads: int, kv_layer: torch.Tensor):
    """The compiled CPU kernel when it applies (float32/bfloat16, head_dim 64 or 128, <= 32 query heads, blocks
    of <= 64 tokens) and could be built, else None."""
    if dtype not in (torch.float32, torch.bfloat16) or kv_layer.shape[-1] not in (64, 128) or num_heads > 32 or \
            kv_layer.shape[2] > 64 or kv_layer.dtype != dtype:
        return None
    return paged_decode_op()


class _DecodePlan:
    """A decode step's gather indices, mask and page buffer, shared by all layers.

    block_ids: flat ids [B * n] of every sequence's first n blocks (n covers the longest context);
    bias: additive mask [B, 1, 1, n * block_size], -inf past each sequence's context;
    pages: the [2, B * n, block_size, Hkv, D] buffer the pages are gathered into.
    """

    __slots__ = ("block_ids", "bias", "pages")

    def __init__(self, meta: AttentionMetadata, kv_layer: torch.Tensor, dtype: torch.dtype) -> None:
        block_size, device = kv_layer.shape[2], kv_layer.device
        nblocks = (max(meta.context_lens) + block_size - 1) // block_size
        self.block_ids = meta.block_tables[:, :nblocks].reshape(-1).long()
        positions = torch.arange(nblocks * block_size, device=device)
        hidden = positions.unsqueeze(0) >= meta.context_lens_t.unsqueeze(1)
        bias = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))
        self.bias = bias.view(meta.num_seqs, 1, 1, -1)
        self.pages = kv_layer.new_empty((2, self.block_ids.numel(), *kv_layer.shape[2:]))
