"""A CPU step with prompt chunks (`torch_ref._PromptStep`): rotary + KV store of every new token in one native call,
the decodes beside the chunks in one native decode call, each chunk by SDPA. It must store the same KV as the
ATen path bit for bit, attend like it, and round every decode exactly as a decode-only step would."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.attention import torch_ref
from splitserve.engine.attention.cpu_kernels import native_ops
from splitserve.engine.attention.metadata import AttentionMetadata
from splitserve.engine.models.layers import RotaryEmbedding

if native_ops() is None:
    pytest.skip("the native CPU kernels could not be built here", allow_module_level=True)

H, HKV, D, BLOCK = 6, 2, 64, 16
SCALE = D ** -0.5


def _setup(dtype: torch.dtype, cached: list[int], new: list[int]):
    """A KV cache holding `cached[s]` random tokens of sequence s, the step's metadata for `new[s]` more tokens,
    and the fused qkv rows of those tokens."""
    g = torch.Generator().manual_seed(3)
    tables, start = [], 1
    for c, n in zip(cached, new):
        blocks = -(-(c + n) // BLOCK)
        tables.append(list(range(start, start + blocks)))
        start += blocks
    kv = torch.zeros(2, start, BLOCK, HKV, D, dtype=dtype)
    for c, table in zip(cached, tables):
        for p in range(c):
            kv[:, table[p // BLOCK], p % BLOCK] = torch.randn(2, HKV, D, generator=g).to(dtype)
    meta = AttentionMetadata.build(new, [c + n for c, n in zip(cached, new)], tables, BLOCK)
    qkv = torch.randn(sum(new), (H + 2 * HKV) * D, generator=g).to(dtype)
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new)])
    rotary = RotaryEmbedding(D, 4096, 10000.0)
    rotary.build_tables()
    cos, signed_sin = rotary.tables(positions, dtype)
    return kv, meta, qkv, positions, rotary, cos, signed_sin


def _aten_path(kv, meta, qkv, positions, rotary):
    """What the model does without the fused op: rotate, store, attend (Attention.forward)."""
    x = qkv.view(-1, H + 2 * HKV, D)
    qk = rotary.rotate(positions, x[:, :H + HKV])
    torch_ref.store_kv(qk[:, H:], x[:, H + HKV:], kv, meta.slot_mapping)
    return torch_ref.paged_attention(qk[:, :H].contiguous(), kv, meta, SCALE).reshape(len(qkv), -1)


# decodes first (the scheduler's order), decodes between chunks, fresh prompts, later chunks; chunks of up to
# ROW_TOKENS tokens attend as rows of the native decode kernel, longer ones by SDPA
LAYOUTS = {
    "decodes-then-chunk": ([20, 33, 7, 0], [1, 1, 1, 24]),
    "interleaved": ([20, 40, 33, 0, 5], [1, 9, 1, 17, 1]),
    "later-chunk-only": ([32], [16]),
    "short-fresh-prompts": ([0, 12, 0], [5, 1, torch_ref.ROW_TOKENS]),
    "short-chunk-long-context": ([12, torch_ref.ROW_PAIRS // 8], [1, 8]),      # past ROW_PAIRS: by SDPA
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_prompt_step_matches_the_aten_path(dtype, layout):
    cached, new = LAYOUTS[layout]
    kv_ref, meta, qkv, positions, rotary, cos, signed_sin = _setup(dtype, cached, new)
    kv = kv_ref.clone()
    op = torch_ref.rope_store_attention_op(dtype, H, kv, meta)
    assert isinstance(op, torch_ref._PromptStep)
    by_sdpa = [s for s, (c, n) in enumerate(zip(cached, new))
               if n > 1 and (n > torch_ref.ROW_TOKENS or n * (c + n) > torch_ref.ROW_PAIRS)]
    assert [s for s, *_ in op.chunks] == by_sdpa         # the rest attend as rows of the native decode kernel
    with torch.inference_mode():
        expected = _aten_path(kv_ref, meta, qkv, positions, rotary)
        got = op(qkv, cos, signed_sin, kv, meta.slot_mapping, meta.block_tables, meta.context_lens_t, H, SCALE)
    assert torch.equal(kv, kv_ref)                     # rotary and store: the same bits as the ATen ops
    assert got.shape == expected.shape
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_decode_beside_a_prompt_rounds_as_in_a_decode_only_step(dtype):
    """The decodes of a mixed step go through the same native kernel as a decode-only step: the same bits."""
    cached, new = LAYOUTS["interleaved"]
    kv, meta, qkv, _, _, cos, signed_sin = _setup(dtype, cached, new)
    singles = [s for s, n in enumerate(new) if n == 1]
    rows = [int(meta.cu_seqlens_q[s]) for s in singles]
    with torch.inference_mode():
        mixed = torch_ref.rope_store_attention_op(dtype, H, kv, meta)(
            qkv, cos, signed_sin, kv, meta.slot_mapping, meta.block_tables, meta.context_lens_t, H, SCALE)
        tables = [meta.block_tables[s].tolist() for s in singles]
        decode_meta = AttentionMetadata.build([1] * len(singles), [meta.context_lens[s] for s in singles], tables,
                                              BLOCK)
        decode_op = torch_ref.rope_store_attention_op(dtype, H, kv, decode_meta)
        alone = decode_op(qkv[rows].contiguous(), cos[rows].contiguous(), signed_sin[rows].contiguous(), kv,
                          decode_meta.slot_mapping, decode_meta.block_tables, decode_meta.context_lens_t, H, SCALE)
    assert torch.equal(mixed[rows], alone)


def test_the_prompt_step_is_built_once_per_step():
    kv, meta, *_ = _setup(torch.float32, [4, 0], [1, 8])
    first = torch_ref.rope_store_attention_op(torch.float32, H, kv, meta)
    assert torch_ref.rope_store_attention_op(torch.float32, H, kv, meta) is first
    assert torch_ref.rope_store_attention_op(torch.float32, H, kv.to("meta"), meta) is None   # not on CPU
