"""The Triton attention kernels against the torch reference (`torch_ref`, the oracle).

On a CPU machine these run the kernels under Triton's interpreter: `TRITON_INTERPRET=1 python3 -m pytest ...`
(scripts/test.sh sets it). Without it and without CUDA the module is skipped. The `gpu` tests compile the kernels
for a CUDA device with realistic, larger shapes.

Every cache is poisoned: blocks and page tails that hold no valid position are filled with a large value, and
block 0 (the padding of block tables) is never allocated, so a kernel reading anything it should not changes the
result far beyond the tolerances.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from splitserve.engine.attention import backend as backend_mod
from splitserve.engine.attention import torch_ref
from splitserve.engine.attention.metadata import AttentionMetadata
from splitserve.settings import settings

INTERPRET = settings.triton_interpret          # TRITON_INTERPRET=1, read by splitserve.settings
HAS_CUDA = torch.cuda.is_available()

if not INTERPRET and not HAS_CUDA:
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1 (run: TRITON_INTERPRET=1 python3 -m pytest)",
                allow_module_level=True)

from splitserve.engine.attention import triton_kernels as tk  # noqa: E402  (after the skip: imports triton)

DEVICE = "cpu" if INTERPRET else "cuda"
POISON = 100.0
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# (num_heads, num_kv_heads, head_dim, block_size): GQA 3 (SmolLM2: 9 heads / 3 KV heads, head_dim 64), GQA 1
SHAPES = [(9, 3, 64, 16), (4, 4, 32, 8), (6, 2, 32, 16), (3, 1, 64, 8)]
SHAPE_IDS = ["smollm2-gqa3-d64-bs16", "mha-d32-bs8", "gqa3-d32-bs16", "gqa3-d64-bs8"]


@dataclasses.dataclass
class Batch:
    q: torch.Tensor
    kv_layer: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_batch(query_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, device: str = DEVICE, seed: int = 0,
               spare_blocks: int = 5) -> Batch:
    """Random q and a poisoned cache whose sequences own shuffled, non-contiguous blocks (never block 0)."""
    gen = torch.Generator().manual_seed(seed)
    pages = [(c + block_size - 1) // block_size for c in context_lens]
    num_blocks = 1 + sum(pages) + spare_blocks
    pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = []
    for n in pages:
        tables.append(pool[:n])
        pool = pool[n:]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, device=device)

    kv = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), POISON)
    flat = kv.view(2, -1, num_kv_heads, head_dim)
    for table, ctx in zip(tables, context_lens):
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        flat[:, slots] = torch.randn(2, ctx, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen)
    return Batch(q.to(device=device, dtype=dtype), kv.to(device=device, dtype=dtype), meta, head_dim ** -0.5)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    assert torch.isfinite(out).all()
    atol, rtol = TOL[ref.dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def check(b: Batch, fn, **kwargs) -> torch.Tensor:
    out = fn(b.q, b.kv_layer, b.meta, b.scale, **kwargs)
    assert_matches(out, torch_ref.paged_attention(b.q, b.kv_layer, b.meta, b.scale))
    return out


def decode_context_lens(block_size: int) -> list[int]:
    # 1 token, exactly one block, one past a block boundary, several blocks, exactly two blocks
    return [1, block_size, block_size + 1, 3 * block_size + 5, 2 * block_size]


# ---------------------------------------------------------------------------------------------------- decode

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_decode_matches_reference(shape, dtype):
    h, hkv, d, bs = shape
    ctx = decode_context_lens(bs)
    check(make_batch([1] * len(ctx), ctx, h, hkv, d, bs, dtype), tk.paged_decode_attention)


@pytest.mark.parametrize("num_splits,dtype", [(2, torch.float32), (3, torch.bfloat16), (16, torch.float32)],
                         ids=["2-fp32", "3-bf16", "16-fp32"])
def test_decode_split_kv_matches_reference(num_splits, dtype):
    """Flash-decoding partitions (16 > pages: short sequences get empty splits) merged by the reduce kernel."""
    ctx = decode_context_lens(8) + [70]
    check(make_batch([1] * len(ctx), ctx, 9, 3, 64, 8, dtype, seed=1), tk.decode_attention, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_large_group_uses_dot(dtype):
    """16 query heads on one KV head: the group x page scores go through tl.dot."""
    check(make_batch([1, 1, 1], [1, 16, 40], 16, 1, 32, 16, dtype, seed=2), tk.paged_decode_attention)


def test_decode_on_strided_views():
    """q sliced out of a fused qkv projection and kv_layer as one layer of a multi-layer cache."""
    b = make_batch([1, 1, 1], [5, 16, 33], 9, 3, 64, 16, torch.float32, seed=3)
    qkv = torch.randn(3, 9 + 2 * 3, 64, device=DEVICE)
    qkv[:, :9] = b.q
    cache = torch.randn(3, *b.kv_layer.shape, device=DEVICE)
    cache[1] = b.kv_layer
    q, kv_layer = qkv[:, :9], cache[1]
    assert not q.is_contiguous()
    out = tk.paged_decode_attention(q, kv_layer, b.meta, b.scale)
    assert_matches(out, torch_ref.paged_attention(q.contiguous(), kv_layer, b.meta, b.scale))


def test_decode_rejects_prefill_batches():
    b = make_batch([2, 1], [4, 5], 4, 4, 32, 8, torch.float32)
    with pytest.raises(ValueError, match="query_len == 1"):
        tk.paged_decode_attention(b.q, b.kv_layer, b.meta, b.scale)


# ---------------------------------------------------------------------------------------------------- prefill

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prefill_without_cached_context(shape, dtype):
    h, hkv, d, bs = shape
    lens = [7, 2 * bs, 23]
    check(make_batch(lens, lens, h, hkv, d, bs, dtype, seed=4), tk.paged_prefill_attention)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prefill_chunk_on_cached_context(shape, dtype):
    """Chunked prefill / prefix-cache hits: the chunk's queries start mid-sequence, at block boundaries or not."""
    h, hkv, d, bs = shape
    query_lens = [5, 20, bs, 3]
    context_lens = [37, 20 + 2 * bs, 3 * bs, 3 + bs - 1]
    check(make_batch(query_lens, context_lens, h, hkv, d, bs, dtype, seed=5), tk.paged_prefill_attention)


@pytest.mark.parametrize("block_m,tile_n,dtype",
                         [(16, 16, torch.float32), (32, 64, torch.bfloat16), (128, 16, torch.float32)],
                         ids=["16x16-fp32", "32x64-bf16", "128x16-fp32"])
def test_prefill_tilings(block_m, tile_n, dtype):
    """Query tiles smaller/larger than the chunks and KV tiles smaller/larger than a page (of 8)."""
    b = make_batch([1, 19, 26, 6], [30, 19, 43, 6 + 16], 9, 3, 64, 8, dtype, seed=6)
    check(b, tk.prefill_attention, block_m=block_m, tile_n=tile_n)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mixed_decode_and_prefill_batch(dtype):
    """Decode tokens, a fresh prompt and a chunk on cached context in one batch, through the prefill kernel."""
    b = make_batch([1, 12, 1, 30, 1], [40, 12, 9, 50, 16], 9, 3, 64, 16, dtype, seed=7)
    assert not b.meta.is_decode_only
    check(b, tk.paged_prefill_attention)


def test_prefill_kernel_serves_decode_only_batches():
    b = make_batch([1, 1, 1], [1, 16, 45], 9, 3, 64, 16, torch.float32, seed=8)
    out = check(b, tk.paged_prefill_attention)
    torch.testing.assert_close(out, tk.paged_decode_attention(b.q, b.kv_layer, b.meta, b.scale),
                               atol=1e-5, rtol=1e-5)


def test_prefill_on_strided_views():
    b = make_batch([4, 9], [10, 9], 6, 2, 32, 8, torch.float32, seed=9)
    qkv = torch.randn(13, 6 + 2 * 2, 32, device=DEVICE)
    qkv[:, :6] = b.q
    cache = torch.randn(2, *b.kv_layer.shape, device=DEVICE)
    cache[1] = b.kv_layer
    out = tk.paged_prefill_attention(qkv[:, :6], cache[1], b.meta, b.scale)
    assert_matches(out, torch_ref.paged_attention(b.q, b.kv_layer, b.meta, b.scale))


# ---------------------------------------------------------------------------------------------------- store_kv

@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float32, torch.bfloat16), (torch.float16, torch.float16)],
                         ids=["fp32", "bf16", "fp32-into-bf16", "fp16"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_store_kv_writes_exactly_its_slots(block_size, src_dtype, cache_dtype):
    """Every cache element equals the reference's result: the new tokens' slots hold k/v, nothing else changed
    (the rest of the layer and the other layers of the cache)."""
    num_kv_heads, head_dim = 3, 32
    meta = AttentionMetadata.build([1, 7, 1, 12], [9, 7, 17, 30], [[5, 2], [9], [4, 11, 1], [3, 8, 6, 10]],
                                   block_size, device=DEVICE)
    gen = torch.Generator().manual_seed(10)
    cache = torch.randn(3, 2, 12, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE, cache_dtype)
    k, v = (torch.randn(21, num_kv_heads, head_dim, generator=gen).to(DEVICE, src_dtype) for _ in range(2))
    expected = cache.clone()
    torch_ref.store_kv(k, v, expected[1], meta.slot_mapping)
    before = cache.clone()
    tk.store_kv(k, v, cache[1], meta.slot_mapping)
    assert torch.equal(cache, expected)
    changed = (cache != before).any(dim=(-1, -2)).nonzero().tolist()     # [layer, kv, block, offset]
    written = {(1, i, s // block_size, s % block_size) for s in meta.slot_mapping.tolist() for i in (0, 1)}
    assert set(map(tuple, changed)) <= written and len(changed) == len(written)


def test_store_kv_strided_inputs_and_empty():
    """k and v sliced out of a fused qkv tensor; an empty slot_mapping writes nothing."""
    meta = AttentionMetadata.build([3, 1], [3, 6], [[2], [1, 3]], 4, device=DEVICE)
    qkv = torch.randn(4, 2 + 2 + 2, 16, device=DEVICE)
    k, v = qkv[:, 2:4], qkv[:, 4:6]
    cache = torch.zeros(2, 5, 4, 2, 16, device=DEVICE)
    expected = cache.clone()
    torch_ref.store_kv(k, v, expected, meta.slot_mapping)
    tk.store_kv(k, v, cache, meta.slot_mapping)
    assert torch.equal(cache, expected)
    empty = torch.empty(0, 2, 16, device=DEVICE)
    tk.store_kv(empty, empty, cache, torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert torch.equal(cache, expected)


def test_store_kv_rounds_to_nearest_even_into_bf16():
    """float32 -> bfloat16 stores round like torch (and the GPU): ties to even, carries into the exponent, inf."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x3FFFFFFF, 0xBF808000, 0x7F7FFFFF, 0x00000001,
                         0x7F800000, 0xFF800000, 0x3F800000, 0x00400000, 0x80000000], dtype=torch.int64)
    k = bits.to(torch.int32).view(torch.float32).view(-1, 1, 1).expand(-1, 1, 16).contiguous().to(DEVICE)
    slots = torch.arange(k.shape[0], device=DEVICE)
    cache, expected = (torch.zeros(2, 4, 4, 1, 16, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    torch_ref.store_kv(k, -k, expected, slots)
    tk.store_kv(k, -k, cache, slots)
    assert torch.equal(cache.view(torch.int16), expected.view(torch.int16))


# ---------------------------------------------------------------------------------------------------- backend

def test_backend_registry():
    ref = backend_mod.get_attention_backend("torch", "cpu")
    assert ref.name == "torch" and ref.paged_attention is torch_ref.paged_attention
    assert backend_mod.get_attention_backend("auto", "cpu").name == "torch"
    assert backend_mod.get_attention_backend("auto", torch.device("cuda")).name == "triton"
    tri = backend_mod.get_attention_backend("triton", DEVICE)
    assert tri.name == "triton" and tri.store_kv is tk.store_kv
    with pytest.raises(dataclasses.FrozenInstanceError):
        tri.name = "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        backend_mod.get_attention_backend("flash", "cpu")


def test_backend_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(backend_mod, "settings", dataclasses.replace(settings, triton_interpret=False))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backend_mod.get_attention_backend("triton", "cpu")
    monkeypatch.setattr(backend_mod, "settings", dataclasses.replace(settings, triton_interpret=True))
    assert backend_mod.get_attention_backend("triton", "cpu").name == "triton"


def test_importing_backend_does_not_import_triton():
    code = ("import sys; from splitserve.engine.attention import backend; "
            "backend.get_attention_backend('auto', 'cpu'); assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("query_lens,context_lens", [([1, 1, 1, 1], [1, 16, 17, 40]), ([1, 9, 1], [33, 20, 16])],
                         ids=["decode", "mixed"])
def test_triton_backend_store_then_attend(query_lens, context_lens):
    """One attention layer step as the model runner does it: store this step's KV, then attend (dispatch by batch)."""
    tri, ref = (backend_mod.get_attention_backend(name, DEVICE) for name in ("triton", "torch"))
    b = make_batch(query_lens, context_lens, 9, 3, 64, 16, torch.bfloat16, seed=11)
    gen = torch.Generator().manual_seed(12)
    k, v = (torch.randn(sum(query_lens), 3, 64, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    kv_ref = b.kv_layer.clone()
    ref.store_kv(k, v, kv_ref, b.meta.slot_mapping)
    tri.store_kv(k, v, b.kv_layer, b.meta.slot_mapping)
    assert torch.equal(b.kv_layer, kv_ref)
    assert_matches(tri.paged_attention(b.q, b.kv_layer, b.meta, b.scale),
                   ref.paged_attention(b.q, kv_ref, b.meta, b.scale))


@pytest.mark.parametrize("query_lens,context_lens", [([1, 1, 1], [1, 17, 40]), ([1, 9], [33, 20])],
                         ids=["decode", "mixed"])
def test_backends_on_the_layouts_pair_storage(query_lens, context_lens):
    """A layer of a cache from `KVLayout.allocate` (K and V of a page adjacent: block stride twice the K/V stride)
    gives what the same pages in a plain contiguous layer give, through both backends' store and attention."""
    from splitserve.engine.kv_layout import KVLayout

    b = make_batch(query_lens, context_lens, 9, 3, 64, 16, torch.float32, seed=13)
    layout = KVLayout(num_layers=2, num_blocks=b.kv_layer.shape[1], block_size=16, num_kv_heads=3, head_dim=64,
                      dtype=torch.float32)
    cache = layout.allocate(DEVICE)
    paired = cache[1]
    paired.copy_(b.kv_layer)
    assert paired.stride(1) == 2 * paired.stride(0) and not paired.is_contiguous()
    gen = torch.Generator().manual_seed(14)
    k, v = (torch.randn(sum(query_lens), 3, 64, generator=gen).to(DEVICE) for _ in range(2))
    expected = b.kv_layer.clone()
    torch_ref.store_kv(k, v, expected, b.meta.slot_mapping)
    reference = torch_ref.paged_attention(b.q, expected, b.meta, b.scale)
    for name in ("torch", "triton"):
        backend = backend_mod.get_attention_backend(name, DEVICE)
        paired.copy_(b.kv_layer)
        backend.store_kv(k, v, paired, b.meta.slot_mapping)
        assert torch.equal(paired, expected) and not cache[0].any(), name
        assert_matches(backend.paged_attention(b.q, paired, b.meta, b.scale), reference)


# ---------------------------------------------------------------------------------------------------- GPU

_COMPILE_FOR_CUDA = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splitserve.engine.attention import triton_kernels as tk

def compile_for(fn, consts, types):
    consts = {n: v for n, v in consts.items() if n in fn.arg_names}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))

for dt in ("bf16", "fp32"):
    ptrs = dict(q_ptr="*" + dt, kv_ptr="*" + dt, out_ptr="*" + dt, bt_ptr="*i32", ctx_ptr="*i32", cu_q_ptr="*i32",
                part_ml_ptr="*fp32", part_acc_ptr="*fp32", scale_log2="fp32", k_ptr="*fp32", v_ptr="*fp32",
                slot_ptr="*i64")
    common = dict(HEAD_DIM=64, HEAD_DIM_PAD=64, BLOCK_SIZE=16, IEEE=dt == "fp32", INTERPRET=False)
    for group, use_dot, splits in ((3, False, 4), (16, True, 1)):
        compile_for(tk._decode_kernel, dict(common, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
                    BLOCK_SIZE_PAD=16, NUM_SPLITS=splits, USE_DOT=use_dot), ptrs)
    compile_for(tk._prefill_kernel, dict(common, GROUP=3, GROUP_PAD=4, BLOCK_Q=16, TILE_N=32), ptrs)
    compile_for(tk._decode_reduce_kernel, dict(common, NUM_SPLITS=4, SPLITS_PAD=4), ptrs)
    compile_for(tk._store_kv_kernel, dict(common, NUM_KV_HEADS=3, HEADS_PAD=4), ptrs)
"""


@pytest.mark.slow
def test_kernels_compile_for_cuda():
    """Ahead-of-time compile every kernel variant for sm_90 (no GPU needed: triton ships ptxas): the code paths
    the interpreter never takes (INTERPRET=False branches, tl.dot shape rules, bf16 MMA) at least build."""
    # TRITON_INTERPRET must be unset when triton is imported for its functions to compile rather than interpret
    result = subprocess.run(["env", "-u", "TRITON_INTERPRET", sys.executable, "-W", "ignore", "-c", _COMPILE_FOR_CUDA],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]


gpu_only = pytest.mark.skipif(not HAS_CUDA or INTERPRET,
                              reason="needs a CUDA device with compiled (not interpreted: TRITON_INTERPRET unset) "
                                     "Triton kernels")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_realistic_shapes(dtype):
    """SmolLM2-sized heads, long contexts and many sequences: the split-KV heuristic and large tiles in play."""
    gen = torch.Generator().manual_seed(13)
    ctx = torch.randint(1, 3000, (48,), generator=gen).tolist()
    check(make_batch([1] * len(ctx), ctx, 9, 3, 64, 16, dtype, device="cuda"), tk.paged_decode_attention)
    check(make_batch([1] * 4, [1, 16, 1500, 4000], 9, 3, 64, 16, dtype, device="cuda"), tk.paged_decode_attention)
    query_lens = [1, 512, 1, 77, 300]
    context_lens = [900, 512, 17, 1077, 2300]
    check(make_batch(query_lens, context_lens, 9, 3, 64, 16, dtype, device="cuda"), tk.paged_prefill_attention)
    check(make_batch([1, 1], [200, 33], 32, 2, 128, 16, dtype, device="cuda"), tk.paged_decode_attention)
    check(make_batch([128, 1], [200, 33], 32, 8, 128, 8, dtype, device="cuda"), tk.paged_prefill_attention)
