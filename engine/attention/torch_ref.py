"""The torch reference attention backend: the oracle for the Triton kernels, and the CPU path.

kv_layer is one layer's `[2, num_blocks, block_size, num_kv_heads, head_dim]` view of the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] written to their slots."""
    flat = kv_layer.view(2, -1, kv_layer.shape[-2], kv_layer.shape[-1])
    flat[0].index_copy_(0, slot_mapping, k.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(flat.dtype))


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
        qs = q[start:start + qlen].transpose(0, 1)                             # [H, q, D]
        k, v = _gather(kv_layer, meta.block_tables[s], clen)
        k, v = k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)   # [Hkv, c, D]
        if qlen == clen:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            qpos = torch.arange(clen - qlen, clen).unsqueeze(1)
            mask = torch.arange(clen).unsqueeze(0) <= qpos                     # [q, c]
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + qlen] = o.transpose(0, 1)
        start += qlen
    return out


def _decode(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """All sequences have one new token: one batched, masked attention over their gathered pages."""
    bsz = meta.num_seqs
    block_size = kv_layer.shape[2]
    max_len = max(meta.context_lens)
    nblocks = (max_len + block_size - 1) // block_size
    tables = meta.block_tables[:, :nblocks].long()
    pages = kv_layer[:, tables]                                   # [2, B, n, bs, Hkv, D]
    pages = pages.flatten(2, 3)[:, :, :max_len].transpose(2, 3)   # [2, B, Hkv, L, D]
    k, v = pages[0].to(q.dtype), pages[1].to(q.dtype)
    mask = torch.arange(max_len, device=q.device).unsqueeze(0) < meta.context_lens_t.unsqueeze(1)
    o = F.scaled_dot_product_attention(
        q.view(bsz, -1, 1, q.shape[-1]), k, v, attn_mask=mask.view(bsz, 1, 1, max_len), scale=scale, enable_gqa=True)
    return o.view(bsz, -1, q.shape[-1])
