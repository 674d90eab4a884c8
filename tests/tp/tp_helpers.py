"""Helpers for the tensor- and layer-parallel tests: float32 engine configs, prompts and a bare forward harness.

A module of its own name (not conftest) so that `from tp_helpers import ...` finds it whichever test folders
are collected together."""

from __future__ import annotations

import torch

from splitserve.engine.attention.backend import get_attention_backend
from splitserve.engine.attention.metadata import AttentionMetadata
from splitserve.engine.config import EngineConfig
from splitserve.engine.models.llama import ForwardContext

PROMPTS = ["The quick brown fox", "What is the capital of France?", "def fibonacci(n):",
           "Once upon a time, in a small village by the river,"]
F32 = dict(dtype="float32", num_kv_blocks=64, max_num_seqs=8, verbose=False)


def f32_config(**overrides) -> EngineConfig:
    return EngineConfig(**{**F32, **overrides})


@torch.inference_mode()
def forward_logits(model, token_ids: list[int], num_decode: int = 3, block_size: int = 16,
                   kv_heads: int | None = None, kv_out: list | None = None) -> torch.Tensor:
    """Logits [len(token_ids), vocab] of one sequence run through `model` on a fresh KV cache: a prefill of all but
    the last `num_decode` tokens, then one decode step per remaining token (both attention paths). `kv_heads`:
    KV heads per layer held here (default: the first layer's); `kv_out` receives the KV cache tensor."""
    cfg = model.config
    n = len(token_ids)
    blocks = list(range((n + block_size - 1) // block_size))
    kv_heads = kv_heads or model.layers[0].self_attn.num_kv_heads
    kv = torch.zeros(cfg.num_hidden_layers, 2, len(blocks), block_size, kv_heads, cfg.head_dim,
                     dtype=model.embed_tokens.weight.dtype)
    if kv_out is not None:
        kv_out.append(kv)
    backend = get_attention_backend("torch", "cpu")
    out, done = [], 0
    for chunk in [n - num_decode] + [1] * num_decode:
        meta = AttentionMetadata.build([chunk], [done + chunk], [blocks], block_size)
        ids = torch.tensor(token_ids[done:done + chunk])
        positions = torch.arange(done, done + chunk)
        out.append(model.compute_logits(model(ids, positions, ForwardContext(kv, meta, backend))))
        done += chunk
    return torch.cat(out)


def teacher_forced_logits(engine, token_ids: list[int]) -> torch.Tensor:
    """Every position's logits for `token_ids` through the engine's runner (rank 0 drives the others under TP)."""
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.engine.scheduler import ScheduledBatch
    from splitserve.engine.sequence import Sequence

    seq = Sequence("teacher-forced", token_ids, SamplingParams(max_tokens=1))
    assert engine.block_manager.allocate(seq, len(token_ids))
    try:
        return engine.runner.logits(ScheduledBatch([seq], [len(token_ids)]))
    finally:
        engine.block_manager.free(seq)
