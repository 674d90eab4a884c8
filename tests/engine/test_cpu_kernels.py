"""The native CPU kernels (`engine/attention/cpu_decode.cpp`, `engine/models/cpu_layers.cpp`) against the torch
formulas they replace. Skipped where they cannot be built (no C++ compiler).

The KV cache is poisoned like in the Triton tests: unallocated blocks and page tails hold a large value, and
block 0 (the padding of block tables) is never allocated, so reading anything outside a context shows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine.attention import torch_ref
from splitserve.engine.attention.cpu_kernels import native_ops
from splitserve.engine.attention.metadata import AttentionMetadata

ops = native_ops()
if ops is None:
    pytest.skip("the native CPU kernels could not be built here", allow_module_level=True)

POISON = 100.0


def _paged_case(dtype: torch.dtype, context_lens: list[int], heads: int, kv_heads: int, head_dim: int,
                block_size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(need) + 3
    kv = torch.full((2, num_blocks, block_size, kv_heads, head_dim), POISON)
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()      # block 0 never allocated
    tables, start = [], 0
    for c, n in zip(context_lens, need):
        table = ids[start:start + n]
        start += n
        tables.append(table)
        for p in range(c):
            kv[:, table[p // block_size], p % block_size] = torch.randn(2, kv_heads, head_dim, generator=g)
    q = torch.randn(len(context_lens), heads, head_dim, generator=g)
    meta = AttentionMetadata.build([1] * len(context_lens), context_lens, tables, block_size)
    return q.to(dtype), kv.to(dtype), meta


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,lens", [
    (9, 3, 64, [1, 5, 16, 17, 33, 120]),           # SmolLM2's shape; block edges
    (4, 4, 128, [3, 64, 65]),                       # no grouping, head_dim 128
    (8, 1, 64, [200]),                              # one KV head for all
])
def test_paged_decode_matches_reference(dtype, tol, heads, kv_heads, head_dim, lens):
    q, kv, meta = _paged_case(dtype, lens, heads, kv_heads, head_dim)
    expected = torch_ref.decode_reference(q, kv, meta, head_dim ** -0.5)
    got = ops.paged_decode(q, kv, meta.block_tables, meta.context_lens_t, head_dim ** -0.5)
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,lens,block_size,q_scale", [
    (9, 3, 64, [7, 40, 100], 32, 1.0),              # two 16-token chunks per block
    (9, 3, 64, [7, 40, 100], 8, 1.0),               # chunks shorter than 16 tokens
    (12, 2, 64, [90, 33], 16, 1.0),                 # 6 query heads per KV head: two register groups
    (6, 2, 128, [50, 129], 64, 1.0),                # head_dim 128, 3 query heads per KV head
    (9, 3, 64, [1, 77, 300], 16, 20.0),             # peaked softmax: most weights underflow to 0
])
def test_paged_decode_chunks_and_groups(dtype, tol, heads, kv_heads, head_dim, lens, block_size, q_scale):
    q, kv, meta = _paged_case(dtype, lens, heads, kv_heads, head_dim, block_size)
    q = (q.float() * q_scale).to(dtype)
    expected = torch_ref.decode_reference(q, kv, meta, head_dim ** -0.5)
    got = ops.paged_decode(q, kv, meta.block_tables, meta.context_lens_t, head_dim ** -0.5)
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


def test_decode_uses_the_kernel_and_agrees_in_a_layer_view():
    """The engine passes one layer's view of the whole cache ([layers, 2, ...][i]): strides must be honoured."""
    q, kv, meta = _paged_case(torch.bfloat16, [7, 40], 9, 3, 64)
    cache = torch.stack([torch.zeros_like(kv), kv])      # layer 1 is the real one
    got = torch_ref.paged_attention(q, cache[1], meta, 0.125)
    torch.testing.assert_close(got.float(), torch_ref.decode_reference(q, kv, meta, 0.125).float(),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rows", [1, 7, 128])
def test_rms_norm_same_roundings_as_torch(rows):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 576, generator=g) * 3).bfloat16()
    weight = (torch.randn(576, generator=g) * 0.5 + 1).bfloat16()
    expected = weight * F.rms_norm(x.float(), (576,), None, 1e-5).bfloat16()
    got = ops.rms_norm(x, weight, 1e-5)
    # only mean(x^2)'s summation order differs: at most one bfloat16 step on a handful of elements
    assert (got.float() - expected.float()).abs().le(expected.float().abs() * 2 ** -7 + 1e-6).all()
    assert (got != expected).float().mean() < 0.01


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_silu_mul_same_roundings_as_torch(rows):
    g = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 1536, generator=g) * 4).bfloat16()
    gate, up = gate_up.split(1536, dim=-1)
    expected = F.silu(gate) * up
    got = ops.silu_mul(gate_up)
    assert (got.float() - expected.float()).abs().le(expected.float().abs() * 2 ** -7 + 1e-6).all()
    assert (got != expected).float().mean() < 0.01


def test_bad_inputs_raise():
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="even"):
        ops.silu_mul(torch.randn(2, 7).bfloat16())


def _rope_store_case(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, lens: list[int], seed: int = 0):
    """A decode step's qkv projection, rotary tables and KV cache (contexts of `lens`, the new token last)."""
    from splitserve.engine.models.layers import RotaryEmbedding

    _, kv, meta = _paged_case(dtype, lens, heads, kv_heads, head_dim, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    qkv = (torch.randn(len(lens), (heads + 2 * kv_heads) * head_dim, generator=g) * 2).to(dtype)
    positions = torch.tensor([c - 1 for c in lens])
    rotary = RotaryEmbedding(head_dim, 512, 10000.0)
    cos, sin = rotary.tables(positions, dtype)
    return qkv, kv, meta, rotary, positions, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,lens", [
    (9, 3, 64, [1, 5, 16, 17, 33, 120]),
    (4, 4, 128, [3, 64, 65]),
])
def test_rope_store_decode_same_as_the_three_torch_steps(dtype, heads, kv_heads, head_dim, lens):
    """Rotary, KV store and attention in one call: the cache gets bit-identical K and V (the rotation rounds as
    the ATen expression does, in both dtypes), and the output is what paged_decode gives on the rotated q."""
    qkv, kv, meta, rotary, positions, cos, sin = _rope_store_case(dtype, heads, kv_heads, head_dim, lens)
    x = qkv.view(len(lens), heads + 2 * kv_heads, head_dim)
    qk = rotary.rotate(positions, x[:, :heads + kv_heads])
    expected_kv = kv.clone()
    torch_ref.store_kv(qk[:, heads:], x[:, heads + kv_heads:], expected_kv, meta.slot_mapping)
    expected = ops.paged_decode(qk[:, :heads].contiguous(), expected_kv, meta.block_tables, meta.context_lens_t,
                                head_dim ** -0.5)
    got = ops.rope_store_decode(qkv, cos, sin, kv, meta.slot_mapping, meta.block_tables, meta.context_lens_t,
                                heads, head_dim ** -0.5)
    assert torch.equal(kv, expected_kv)
    assert got.shape == (len(lens), heads * head_dim)
    assert torch.equal(got, expected.view(len(lens), -1))


def test_rope_store_decode_writes_only_the_new_slots_of_a_layer_view():
    qkv, kv, meta, _, _, cos, sin = _rope_store_case(torch.bfloat16, 9, 3, 64, [7, 40])
    cache = torch.stack([torch.zeros_like(kv), kv.clone(), torch.zeros_like(kv)])      # layer 1 is the real one
    ops.rope_store_decode(qkv, cos, sin, cache[1], meta.slot_mapping, meta.block_tables, meta.context_lens_t,
                          9, 0.125)
    assert not cache[0].any() and not cache[2].any()
    changed = (cache[1] != kv).view(2, -1, 3 * 64).any(-1).any(0).nonzero().flatten()   # slots that changed
    assert changed.tolist() == sorted(meta.slot_mapping.tolist())


def test_rope_store_decode_bad_inputs_raise():
    qkv, kv, meta, _, _, cos, sin = _rope_store_case(torch.float32, 9, 3, 64, [7, 40])
    with pytest.raises(RuntimeError, match="num_heads"):
        ops.rope_store_decode(qkv, cos, sin, kv, meta.slot_mapping, meta.block_tables, meta.context_lens_t, 8, 0.1)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.rope_store_decode(qkv, cos.bfloat16(), sin, kv, meta.slot_mapping, meta.block_tables,
                              meta.context_lens_t, 9, 0.1)


@pytest.mark.parametrize("rows", [1, 7, 128])
def test_add_rms_norm_is_the_bf16_add_then_rms_norm(rows):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 576, generator=g) * 3).bfloat16()
    delta = (torch.randn(rows, 576, generator=g) * 3).bfloat16()
    weight = (torch.randn(576, generator=g) * 0.5 + 1).bfloat16()
    summed = x + delta
    got = ops.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(x, summed)                                  # updated in place, rounded as ATen's add
    assert torch.equal(got, ops.rms_norm(summed, weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [1, 15, 16, 49152, 1000])
def test_argmax_rows_equals_torch_argmax(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g).to(dtype)
    logits[1] = logits[1].round()                                  # many ties: the first maximum wins
    logits[2] = float("-inf")
    if vocab > 3:
        logits[3, vocab // 2] = float("nan")                       # a NaN is the maximum, as in ATen
        logits[4, -1] = logits[4].max() + 1                        # the maximum in the scalar tail
        logits[5, 0] = logits[5].max()                             # tied with a later maximum
    assert torch.equal(ops.argmax_rows(logits), logits.argmax(dim=-1))


@pytest.mark.parametrize("heads,kv_heads,head_dim,lens,block_size,q_scale", [
    (9, 3, 64, [1, 15, 16, 17, 31, 32, 33, 120], 16, 1.0),   # SmolLM2's shape; 16- and 32-token tile edges
    (9, 3, 64, [7, 40, 100], 32, 1.0),                        # two 16-token tiles per page
    (32, 8, 128, [50, 129], 16, 1.0),                         # 32 heads: two score tiles of 16, head_dim 128
    (12, 2, 64, [90, 33], 48, 1.0),                           # 6 query heads per KV head, 3 tiles per page
    (16, 1, 64, [2, 500], 16, 1.0),                           # 16 query heads on one KV head
    (9, 3, 64, [1, 77, 300], 64, 20.0),                       # peaked softmax
])
def test_paged_decode_tiles_and_vectors_agree(heads, kv_heads, head_dim, lens, block_size, q_scale):
    """bfloat16 runs on AMX tiles where the CPU has them (`tiles=True`, the default; elsewhere it is the AVX-512
    kernel as with `tiles=False`): both within bfloat16 rounding of a float32 reference, on a [2, blocks, ...]
    cache and on the engine's page-pair memory (K and V of a page side by side, the same view)."""
    q, kv, meta = _paged_case(torch.bfloat16, lens, heads, kv_heads, head_dim, block_size)
    q = (q.float() * q_scale).to(torch.bfloat16)
    scale = head_dim ** -0.5
    expected = torch_ref.decode_reference(q.float(), kv.float(), meta, scale)
    paired = kv.transpose(0, 1).contiguous().transpose(0, 1)
    for cache in (kv, paired):
        for tiles in (True, False):
            got = ops.paged_decode(q, cache, meta.block_tables, meta.context_lens_t, scale, tiles)
            torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_paged_decode_tiles_never_use_rows_past_the_context():
    """The tile kernel works on whole 16-token tiles: a page's tail past the context (NaN here) must neither be
    read nor reach the output (a partial last K tile is copied into a zero-padded buffer, V rows are skipped)."""
    q, kv, meta = _paged_case(torch.bfloat16, [1, 7, 17, 40], 9, 3, 64)
    expected = ops.paged_decode(q, kv, meta.block_tables, meta.context_lens_t, 0.125)
    poisoned = torch.where(kv == POISON, torch.full_like(kv, float("nan")), kv)
    got = ops.paged_decode(q, poisoned, meta.block_tables, meta.context_lens_t, 0.125)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("rows,dim,scale", [(1, 576, 1.0), (32, 576, 1e-3), (128, 576, 30.0), (5, 17, 1.0),
                                            (3, 2048, 1e4)])
def test_rms_norm_f32_is_f_rms_norm_bit_for_bit(rows, dim, scale):
    """float32 must match HF exactly: the same result as F.rms_norm, and with a delta the same as x += delta
    first (x is updated in place)."""
    g = torch.Generator().manual_seed(rows * dim)
    x = torch.randn(rows, dim, generator=g) * scale
    delta = torch.randn(rows, dim, generator=g) * scale
    weight = torch.randn(dim, generator=g)
    assert torch.equal(ops.rms_norm_f32(x.clone(), None, weight, 1e-5), F.rms_norm(x, (dim,), weight, 1e-5))
    expected_x = x.clone().add_(delta)
    expected = F.rms_norm(expected_x, (dim,), weight, 1e-6)
    got = ops.rms_norm_f32(x, delta, weight, 1e-6)
    assert torch.equal(x, expected_x) and torch.equal(got, expected)


def test_rms_norm_f32_bad_inputs_raise():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="float32"):
        ops.rms_norm_f32(x.bfloat16(), None, w, 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm_f32(x, None, torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="delta"):
        ops.rms_norm_f32(x, torch.randn(4, 7), w, 1e-5)


@pytest.mark.parametrize("rows,n", [(1, 1536), (32, 1536), (128, 1536), (3, 17), (2, 48), (5, 100)])
def test_silu_mul_f32_is_the_aten_formula_bit_for_bit(rows, n):
    """32-element steps and a scalar tail, as ATen's vectorized loop (n = 17, 48, 100 have tails)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the model uses silu_mul_f32 only where ATen runs its AVX-512 kernels")
    g = torch.Generator().manual_seed(rows * n)
    for scale in (1e-3, 1.0, 30.0):
        gate_up = torch.randn(rows, 2 * n, generator=g) * scale
        gate, up = gate_up.split(n, dim=-1)
        assert torch.equal(ops.silu_mul_f32(gate_up), F.silu(gate) * up)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 100.0, -100.0, 0.0, -0.0, 1e-40] * 8)
    gate_up = torch.cat([special, special.flip(0)]).view(1, -1)
    gate, up = gate_up.split(64, dim=-1)
    torch.testing.assert_close(ops.silu_mul_f32(gate_up), F.silu(gate) * up, rtol=0, atol=0, equal_nan=True)
