"""Triton kernels for the paged KV cache: decode attention, varlen prefill attention and store_kv.

The wrappers take exactly the arguments of their `torch_ref` counterparts (the oracle) and accept float32,
bfloat16 or float16 tensors; softmax statistics and accumulators are float32. `kv_layer` is one layer's
`[2, num_blocks, block_size, num_kv_heads, head_dim]` view of the cache (see `engine/kv_layout.py`); every
tensor is addressed through its strides, so views (a layer of the cache, q sliced out of a fused qkv) work
without copies.

On CPU tensors the kernels run under Triton's interpreter (`TRITON_INTERPRET=1` must be set before this module
is imported; `backend.py` checks that). The interpreter's `tl.dot` reads bfloat16 operands as raw uint16 bits,
so under the interpreter every `tl.dot` upcasts its operands to float32 first: that is what a GPU bf16/fp16 MMA
computes (exact products, float32 accumulation). The interpreter also truncates float32 -> bfloat16 casts where
the GPU rounds to nearest even, so every cast to the storage dtype goes through `_cast`, which rounds explicitly
under the interpreter. With both, the interpreted numerics are the GPU's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .metadata import AttentionMetadata

_LOG2E = 1.4426950408889634

# Prefill tiling: BLOCK_M rows of (query token, query head of the GQA group) x TILE_N cached positions.
PREFILL_BLOCK_M = 64
PREFILL_TILE_N = 32


def _pow2(n: int, at_least: int = 1) -> int:
    return max(triton.next_power_of_2(n), at_least)


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b with a float32 result. IEEE: exact float32 products for float32 inputs (no TF32)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype), rounding to nearest even into bfloat16 under the interpreter as the GPU does."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            if x.dtype != tl.bfloat16:
                bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)       # round half to even on the 16 dropped bits
                return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# store_kv (reshape_and_cache)
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kv_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_c_kv, stride_c_blk, stride_c_pos, stride_c_h, stride_c_d,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program per new token: copies its [num_kv_heads, head_dim] K and V tiles into slot
    `slot_mapping[token]`, i.e. block `slot // block_size`, offset `slot % block_size`."""
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + tok * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask)
    dst = kv_ptr + blk * stride_c_blk + off * stride_c_pos + h[:, None] * stride_c_h + d[None, :] * stride_c_d
    tl.store(dst, _cast(k, kv_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(dst + stride_c_kv, _cast(v, kv_ptr.dtype.element_ty, INTERPRET), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] written to their slots (same semantics as torch_ref.store_kv)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if kv_layer.shape[0] != 2 or tuple(kv_layer.shape[3:]) != (num_kv_heads, head_dim):
        raise ValueError(f"kv_layer {tuple(kv_layer.shape)} does not hold [{num_kv_heads}, {head_dim}] heads")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping has shape {tuple(slot_mapping.shape)}, expected ({num_tokens},)")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, kv_layer, slot_mapping,
        *k.stride(), *v.stride(), *kv_layer.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=_pow2(num_kv_heads), HEAD_DIM_PAD=_pow2(head_dim), BLOCK_SIZE=kv_layer.shape[2],
        INTERPRET=_interpreting(),
    )


# ----------------------------------------------------------------------------------------------------------------
# Decode: every sequence has one new token
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _decode_kernel(
    q_ptr, kv_ptr, out_ptr, bt_ptr, ctx_ptr, part_ml_ptr, part_acc_ptr,
    scale_log2, pages_per_split,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_c_kv, stride_c_blk, stride_c_pos, stride_c_h, stride_c_d,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_SIZE_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Flash-decoding over pages. Program (seq, kv_head, split) holds the query rows of the whole GQA group
    sharing `kv_head` ([GROUP_PAD, HEAD_DIM_PAD], padded rows/columns masked) and walks the sequence's pages
    `split * pages_per_split ...` through its block table, one page ([BLOCK_SIZE_PAD, HEAD_DIM_PAD] of K and of
    V, loaded once for the whole group) per step, with an online softmax. With NUM_SPLITS == 1 it writes the
    normalised output; otherwise it writes its partial (max, sum, unnormalised acc) for `_decode_reduce_kernel`.
    Scores are a broadcast multiply-sum for small groups, or `tl.dot` when the group and page are >= 16."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(ctx_ptr + seq)
    num_pages = tl.cdiv(ctx, BLOCK_SIZE)
    page_lo = split * pages_per_split
    page_hi = tl.minimum(page_lo + pages_per_split, num_pages)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    n = tl.arange(0, BLOCK_SIZE_PAD)
    heads = kvh * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q_dtype = q_ptr.dtype.element_ty

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    kv_head_ptr = kv_ptr + kvh * stride_c_h + n[:, None] * stride_c_pos + d[None, :] * stride_c_d
    for page in range(page_lo, page_hi):
        blk = tl.load(bt_ptr + seq * stride_bt + page).to(tl.int64)
        n_ok = (n < BLOCK_SIZE) & (page * BLOCK_SIZE + n < ctx)
        page_ptr = kv_head_ptr + blk * stride_c_blk
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = _cast(tl.load(page_ptr, mask=kv_mask, other=0.0), q_dtype, INTERPRET)                   # [N, D]
        v = _cast(tl.load(page_ptr + stride_c_kv, mask=kv_mask, other=0.0), q_dtype, INTERPRET)     # [N, D]
        if USE_DOT:
            s = _dot(q, tl.trans(k), IEEE, INTERPRET)                                  # [G, N]
        else:
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(n_ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))       # finite: every visited page has a valid position
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            pv = _dot(_cast(p, q_dtype, INTERPRET), v, IEEE, INTERPRET)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od,
                 _cast(out, out_ptr.dtype.element_ty, INTERPRET), mask=g_ok[:, None] & d_ok[None, :])
    else:
        # partials laid out as [num_seqs, num_heads, NUM_SPLITS] (ml: x2 for max and sum) and [..., HEAD_DIM_PAD]
        row = (seq * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_ok)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_ok)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _decode_reduce_kernel(
    part_ml_ptr, part_acc_ptr, out_ptr,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Program (seq, head) merges the NUM_SPLITS partial softmaxes of that query row: rescale each split's sum
    and accumulator by exp2(m_split - m_max) (0 for splits that had no pages, whose max is -inf)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    sp_ok = sp < NUM_SPLITS
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS + sp
    m = tl.load(part_ml_ptr + row * 2, mask=sp_ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=sp_ok, other=0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM_PAD + d[None, :], mask=sp_ok[:, None], other=0.0)
    m_max = tl.max(m, axis=0)                        # finite: split 0 always has the first page
    w = tl.exp2(m - m_max)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d * stride_od,
             _cast(out, out_ptr.dtype.element_ty, INTERPRET), mask=d < HEAD_DIM)


def _check_shapes(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> tuple[int, int, int, int]:
    num_tokens, num_heads, head_dim = q.shape
    if kv_layer.dim() != 5 or kv_layer.shape[0] != 2 or kv_layer.shape[4] != head_dim:
        raise ValueError(f"kv_layer {tuple(kv_layer.shape)} is not [2, blocks, block_size, kv_heads, {head_dim}]")
    num_kv_heads = kv_layer.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if meta.block_size != kv_layer.shape[2]:
        raise ValueError(f"meta.block_size={meta.block_size} but kv_layer block_size={kv_layer.shape[2]}")
    return num_tokens, num_heads, head_dim, num_kv_heads


def _default_decode_splits(q: torch.Tensor, num_seqs: int, num_kv_heads: int, max_pages: int) -> int:
    """Split the pages of long sequences across programs when (seq, kv_head) alone cannot fill the GPU."""
    if q.device.type != "cuda" or _interpreting():
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    programs = num_seqs * num_kv_heads
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), max_pages // 8, 32))


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                           scale: float) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim] (one new token per sequence) -> [num_seqs, num_heads, head_dim]."""
    return decode_attention(q, kv_layer, meta, scale, num_splits=None)


def decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float,
                     num_splits: int | None = None) -> torch.Tensor:
    """`paged_decode_attention` with an explicit number of KV splits per sequence (None: a heuristic)."""
    num_tokens, num_heads, head_dim, num_kv_heads = _check_shapes(q, kv_layer, meta)
    if not meta.is_decode_only or num_tokens != meta.num_seqs:
        raise ValueError("paged_decode_attention needs query_len == 1 for every sequence")
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    block_size = kv_layer.shape[2]
    max_pages = triton.cdiv(max(meta.context_lens), block_size)
    if num_splits is None:
        num_splits = _default_decode_splits(q, meta.num_seqs, num_kv_heads, max_pages)
    num_splits = max(1, min(num_splits, max_pages))
    pages_per_split = triton.cdiv(max_pages, num_splits)
    num_splits = triton.cdiv(max_pages, pages_per_split)         # no split left without pages at max length

    group = num_heads // num_kv_heads
    group_pad, bs_pad, d_pad = _pow2(group), _pow2(block_size), _pow2(head_dim, 16)
    if num_splits > 1:
        part_ml = torch.empty((meta.num_seqs, num_heads, num_splits, 2), dtype=torch.float32, device=q.device)
        part_acc = torch.empty((meta.num_seqs, num_heads, num_splits, d_pad), dtype=torch.float32, device=q.device)
    else:
        part_ml = part_acc = out                                 # unused
    _decode_kernel[(meta.num_seqs, num_kv_heads, num_splits)](
        q, kv_layer, out, meta.block_tables, meta.context_lens_t, part_ml, part_acc,
        scale * _LOG2E, pages_per_split,
        *q.stride(), *out.stride(), *kv_layer.stride(), meta.block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_SIZE_PAD=bs_pad,
        NUM_SPLITS=num_splits, USE_DOT=group_pad >= 16 and bs_pad >= 16,
        IEEE=q.dtype == torch.float32, INTERPRET=_interpreting(),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(meta.num_seqs, num_heads)](
            part_ml, part_acc, out, *out.stride(),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, NUM_SPLITS=num_splits, SPLITS_PAD=_pow2(num_splits),
            INTERPRET=_interpreting(),
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Prefill: varlen query chunks on top of cached context (also serves mixed batches)
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, out_ptr, bt_ptr, ctx_ptr, cu_q_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_c_kv, stride_c_blk, stride_c_pos, stride_c_h, stride_c_d,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Causal varlen attention over the paged cache. Program (seq, q_block, kv_head) owns BLOCK_Q consecutive
    query tokens of `seq` times the GROUP_PAD query heads sharing `kv_head`: BLOCK_M = BLOCK_Q * GROUP_PAD rows,
    row r = (token r // GROUP_PAD, head r % GROUP_PAD), so each K/V tile is loaded once for the whole group.
    Token t of the chunk sits at absolute position context_len - query_len + t. The program walks cached
    positions 0 .. (its last token's position) in tiles of TILE_N, looking each position's page up in the block
    table (so TILE_N need not match block_size), masks positions after each row's own (causal), and keeps an
    online softmax per row. Programs whose q_block lies past the sequence's query_len visit nothing and store
    nothing."""
    seq = tl.program_id(0)
    qblk = tl.program_id(1)
    kvh = tl.program_id(2)
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD

    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    ctx = tl.load(ctx_ptr + seq)
    first_pos = ctx - q_len                                   # absolute position of the chunk's token 0

    r = tl.arange(0, BLOCK_M)
    tok = qblk * BLOCK_Q + r // GROUP_PAD
    g = r % GROUP_PAD
    heads = kvh * GROUP + g
    row_ok = (tok < q_len) & (g < GROUP)
    q_pos = first_pos + tok
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_dtype = q_ptr.dtype.element_ty

    # cached positions this tile needs: 0 .. position of its last valid token (nothing if the tile is empty)
    last_tok = tl.minimum((qblk + 1) * BLOCK_Q, q_len)
    kv_end = tl.where(qblk * BLOCK_Q < q_len, first_pos + last_tok, 0)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)            # finite: padded rows never see a valid column
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    n = tl.arange(0, TILE_N)
    for start in range(0, kv_end, TILE_N):
        pos = start + n
        pos_ok = pos < kv_end
        blk = tl.load(bt_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        tok_ptr = kv_ptr + blk * stride_c_blk + (pos % BLOCK_SIZE) * stride_c_pos + kvh * stride_c_h   # [N]
        k_t = tl.load(tok_ptr[None, :] + d[:, None] * stride_c_d,
                      mask=pos_ok[None, :] & d_ok[:, None], other=0.0)                       # [D, N]
        k_t = _cast(k_t, q_dtype, INTERPRET)
        s = _dot(q, k_t, IEEE, INTERPRET) * scale_log2                                      # [M, N]
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(tok_ptr[:, None] + stride_c_kv + d[None, :] * stride_c_d,
                    mask=pos_ok[:, None] & d_ok[None, :], other=0.0)                         # [N, D]
        v = _cast(v, q_dtype, INTERPRET)
        acc = acc * alpha[:, None] + _dot(_cast(p, q_dtype, INTERPRET), v, IEEE, INTERPRET)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :] * stride_od,
             _cast(out, out_ptr.dtype.element_ty, INTERPRET), mask=row_ok[:, None] & d_ok[None, :])


def paged_prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                            scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim], sequence s's queries at q[cu_seqlens_q[s]:cu_seqlens_q[s+1]]
    -> [num_tokens, num_heads, head_dim]. Any mix of query lengths (decode tokens included)."""
    return prefill_attention(q, kv_layer, meta, scale)


def prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float,
                      block_m: int = PREFILL_BLOCK_M, tile_n: int = PREFILL_TILE_N) -> torch.Tensor:
    """`paged_prefill_attention` with explicit tile sizes (powers of two, >= 16 for the GPU's tl.dot)."""
    num_tokens, num_heads, head_dim, num_kv_heads = _check_shapes(q, kv_layer, meta)
    if num_tokens != sum(meta.query_lens):
        raise ValueError(f"q has {num_tokens} tokens but the query_lens sum to {sum(meta.query_lens)}")
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = _pow2(group)
    block_q = max(1, block_m // group_pad)
    grid = (meta.num_seqs, triton.cdiv(max(meta.query_lens), block_q), num_kv_heads)
    _prefill_kernel[grid](
        q, kv_layer, out, meta.block_tables, meta.context_lens_t, meta.cu_seqlens_q,
        scale * _LOG2E,
        *q.stride(), *out.stride(), *kv_layer.stride(), meta.block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=_pow2(head_dim, 16),
        BLOCK_SIZE=kv_layer.shape[2], BLOCK_Q=block_q, TILE_N=tile_n,
        IEEE=q.dtype == torch.float32, INTERPRET=_interpreting(),
    )
    return out


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The Triton backend's entry point: the decode kernel for decode-only batches, else the prefill kernel."""
    if meta.is_decode_only:
        return paged_decode_attention(q, kv_layer, meta, scale)
    return paged_prefill_attention(q, kv_layer, meta, scale)
