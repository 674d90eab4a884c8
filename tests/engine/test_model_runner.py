"""Model-runner helpers: the KV cache layout it allocates and the greedy argmax it samples with."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine import model_runner
from splitserve.engine.kv_layout import KVLayout


def test_kv_cache_is_the_layouts_zeros():
    layout = KVLayout(num_layers=2, num_blocks=300, block_size=16, num_kv_heads=3, head_dim=64,
                      dtype=torch.bfloat16, total_kv_heads=3, tp_rank=0, tp_size=1)
    kv = layout.allocate(torch.device("cpu"))
    assert kv.shape == layout.shape and kv.dtype == torch.bfloat16 and kv.transpose(1, 2).is_contiguous()
    assert not kv.any()


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_tokens_are_the_first_argmax(monkeypatch, native, dtype):
    if not native:
        monkeypatch.setattr(model_runner, "native_ops", lambda: None)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4096, generator=g).to(dtype)
    logits[1] = logits[1].round()                      # ties: the first maximum wins
    logits[2, 4000] = logits[2, 17] = logits[2].max() + 1
    assert model_runner.greedy_tokens(logits) == logits.argmax(dim=-1).tolist()
