"""The torch reference attention backend: the oracle for the Triton kernels, and the CPU path.

Decode on CPU runs the native kernel (`cpu_decode.cpp`, built on first use) when it can be built, else
`decode_reference`, which is also the oracle for that kernel. `rope_store_decode_op` gives the model the native op
that also does the rotary embedding and the KV store of a decode step in the same call.

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
    # 4-D [1, H, len, D] inputs: on CPU only those reach SDPA's flash kernel (3-D ones take the math path, which
    # materializes the [H, q, c] scores: 9x slower per layer for a 512-token bfloat16 prompt, 23x at 2048)
    out = torch.empty_like(q)
    start = 0
    for s, (qlen, clen) in enumerate(zip(meta.query_lens, meta.context_lens)):
        qs = q[start:start + qlen].transpose(0, 1).unsqueeze(0)                # [1, H, q, D]
        k, v = _gather(kv_layer, meta.block_tables[s], clen)
        k = k.transpose(0, 1).unsqueeze(0).to(q.dtype)                         # [1, Hkv, c, D]
        v = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
        if qlen == clen:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:      # a later chunk: every cached token is visible, the chunk's own are causal
            mask = meta.per_step(f"torch_prefill_mask:{s}:{q.dtype}",
                                 lambda: _chunk_mask(qlen, clen, q.dtype, q.device))
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + qlen] = o[0].transpose(0, 1)
        start += qlen
    return out


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


def rope_store_decode_op(dtype: torch.dtype, num_heads: int, kv_layer: torch.Tensor, meta: AttentionMetadata):
    """The native op that does a CPU decode step's rotary embedding, KV store and attention in one call
    (`cpu_decode.cpp`), when this step can use it, else None (prefill, another device or dtype, no native build):
    the caller then rotates, stores and attends with the separate functions. Its signature:

        (qkv [T, (H + 2 Hkv) * D] contiguous, cos [T, 1, D], signed_sin [T, 1, D] (in qkv's dtype), kv_layer,
         slot_mapping, block_tables, context_lens_t, num_heads, scale) -> [T, H * D]
    """
    if not meta.is_decode_only or kv_layer.device.type != "cpu" or _native_decode(dtype, num_heads, kv_layer) is None:
        return None
    return native_ops().rope_store_decode.default


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
