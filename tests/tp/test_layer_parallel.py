"""Layer-pair parallelism on SmolLM2 (float32): an empty range is the sequential model exactly, the fused pair is
the paper's formula, and TP=2 with pairs gives TP=1-with-pairs' greedy tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tp_helpers import f32_config, forward_logits
from splitserve.engine.layer_parallel import ParallelPair, layer_parallel_transform, pair_layers
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.tp_engine import TPEngine

PAIRS = (10, 20)
TEXT = "Once upon a time, in a small village by the river, there lived an old"


class UnfusedPair(nn.Module):
    """The reference: h = x + Attn_l(norm_l(x)) + Attn_l+1(norm_l+1(x)); y = h + MLP_l(norm'_l(h)) + MLP_l+1(...)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x, positions, rotary, kv_pair, ctx):
        a, b = self.first, self.second
        h = (x + a.self_attn(a.input_layernorm(x), positions, rotary, kv_pair[0], ctx)
             + b.self_attn(b.input_layernorm(x), positions, rotary, kv_pair[1], ctx))
        return h + a.mlp(a.post_attention_layernorm(h)) + b.mlp(b.post_attention_layernorm(h))


def unfused_pairs(model, layer_range):
    start, end = layer_range
    layers = list(model.layers[:start]) + [UnfusedPair(model.layers[i], model.layers[i + 1])
                                           for i in range(start, end, 2)] + list(model.layers[end:])
    model.kv_layer_ids = list(range(start)) + [(i, i + 1) for i in range(start, end, 2)] + \
        list(range(end, len(model.layers)))
    model.layers = nn.ModuleList(layers)
    return model


@pytest.fixture(scope="module")
def text_ids(engine_f32):
    return engine_f32.encode_prompt(TEXT)


@pytest.fixture(scope="module")
def sequential(engine_f32, text_ids):
    return forward_logits(engine_f32.runner.model, text_ids)


def test_empty_range_is_the_sequential_model(engine_f32, text_ids, sequential):
    base = engine_f32.runner.model
    assert layer_parallel_transform(None) is None
    assert pair_layers(base, None) is base and base.kv_layer_ids == list(range(30))
    model = pair_layers(copy.deepcopy(base), (12, 12))
    assert model.kv_layer_ids == list(range(30)) and not any(isinstance(m, ParallelPair) for m in model.layers)
    assert torch.equal(forward_logits(model, text_ids), sequential)


def test_fused_pairs_equal_the_unfused_formula(engine_f32, text_ids, sequential):
    base = engine_f32.runner.model
    fused_kv, ref_kv = [], []
    fused = forward_logits(pair_layers(copy.deepcopy(base), PAIRS), text_ids, kv_out=fused_kv)
    reference = forward_logits(unfused_pairs(copy.deepcopy(base), PAIRS), text_ids, kv_heads=3, kv_out=ref_kv)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(fused_kv[0], ref_kv[0], rtol=1e-4, atol=1e-4)   # each layer's KV at its own index
    assert not torch.allclose(fused, sequential, atol=1e-2)                    # pairs do change the function


def test_pair_layers_rewrites_the_kv_layer_ids(engine_f32):
    model = pair_layers(copy.deepcopy(engine_f32.runner.model), PAIRS)
    assert len(model.layers) == 25
    assert model.kv_layer_ids[10:15] == [(10, 11), (12, 13), (14, 15), (16, 17), (18, 19)]
    assert model.kv_layer_ids[:10] == list(range(10)) and model.kv_layer_ids[15:] == list(range(20, 30))
    assert pair_layers(model, PAIRS) is model                      # applying the same range twice: a no-op
    with pytest.raises(ValueError, match="already has"):
        pair_layers(model, (0, 2))


@pytest.mark.parametrize("bad", [(3, 6), (20, 32), (-2, 2)])
def test_bad_ranges_are_refused(engine_f32, bad):
    with pytest.raises(ValueError, match="layer_parallel"):
        pair_layers(engine_f32.runner.model, bad)


def test_tp2_pairs_same_greedy_tokens_as_tp1_pairs(prompt_ids):
    params = SamplingParams(max_tokens=10)
    tp1 = LLMEngine(f32_config(layer_parallel=PAIRS), model_transform=layer_parallel_transform(PAIRS))
    expected = [c.token_ids for c in tp1.generate(prompt_ids, params)]
    del tp1
    with TPEngine(f32_config(tp=2, layer_parallel=PAIRS), timeout_s=30.0) as tp2:
        assert isinstance(tp2.runner.model.layers[10], ParallelPair)
        assert [c.token_ids for c in tp2.generate(prompt_ids, params)] == expected
    assert [p.returncode for p in tp2.followers.procs] == [0]        # close() stopped the follower cleanly
