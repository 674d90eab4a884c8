"""The step plan (`models/step_plan.py`) runs the same ops as the modules: same hidden states bit for bit,
same KV cache, on a small random Llama in float32 and bfloat16 (packed linears where the runner packs them)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.attention.backend import get_attention_backend
from splitserve.engine.attention.cpu_kernels import native_ops
from splitserve.engine.attention.metadata import AttentionMetadata
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.models.step_plan import StepPlan
from splitserve.engine.models.layers import can_pack_linears, pack_linears
from splitserve.engine.models.llama import ForwardContext, LlamaForCausalLM

if native_ops() is None:
    pytest.skip("the native CPU kernels could not be built here", allow_module_level=True)

CFG = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
BLOCK = 16


def _model(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for layer in model.layers:
            layer.input_layernorm.weight.add_(1)
            layer.post_attention_layernorm.weight.add_(1)
        model.norm.weight.add_(1)
    model = model.to(dtype).eval()
    model.rotary.build_tables()
    if can_pack_linears(torch.device("cpu"), dtype):
        pack_linears(model)
    return model


def _step(model: LlamaForCausalLM, kv: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Prefill the contexts, then one decode step; returns the decode step's hidden states."""
    backend = get_attention_backend("torch", "cpu")
    tables, start = [], 1
    for c in lens:
        n = -(-(c + 1) // BLOCK)
        tables.append(list(range(start, start + n)))
        start += n
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, CFG.vocab_size, (c,), generator=g) for c in lens]
    meta = AttentionMetadata.build(lens, lens, tables, BLOCK)
    model(torch.cat(prompts), torch.cat([torch.arange(c) for c in lens]), ForwardContext(kv, meta, backend))
    new = torch.randint(0, CFG.vocab_size, (len(lens),), generator=g)
    meta = AttentionMetadata.build([1] * len(lens), [c + 1 for c in lens], tables, BLOCK)
    return model(new, torch.tensor(lens), ForwardContext(kv, meta, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plan_equals_the_modules(dtype):
    model = _model(dtype)
    plan = StepPlan.build(model)
    assert plan is not None
    lens = [3, 16, 40]
    shape = (CFG.num_hidden_layers, 2, 12, BLOCK, CFG.num_key_value_heads, CFG.head_dim)
    kv_modules, kv_plan = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    ran: list[int] = []
    plan.layers = [lambda *args, step=step: ran.append(1) or step(*args) for step in plan.layers]
    with torch.inference_mode():
        expected = _step(model, kv_modules, lens)
        model.step_plan = plan
        got = _step(model, kv_plan, lens)
    assert len(ran) == 2 * CFG.num_hidden_layers      # the prefill and the decode step both ran the plan
    assert torch.equal(got, expected)
    assert torch.equal(kv_plan, kv_modules)


def test_plan_reports_every_layer_done():
    model = _model(torch.float32)
    model.step_plan = StepPlan.build(model)
    backend = get_attention_backend("torch", "cpu")
    kv = torch.zeros(CFG.num_hidden_layers, 2, 4, BLOCK, CFG.num_key_value_heads, CFG.head_dim)
    meta = AttentionMetadata.build([1], [1], [[1]], BLOCK)
    done: list[int] = []
    with torch.inference_mode():
        model(torch.tensor([5]), torch.tensor([0]), ForwardContext(kv, meta, backend, done.append))
    assert done == list(range(CFG.num_hidden_layers))


def test_no_plan_for_layers_it_does_not_know():
    from splitserve.engine.layer_parallel import pair_layers

    model = pair_layers(_model(torch.float32), (0, 2))
    assert StepPlan.build(model) is None


def test_copies_and_rewritten_models_run_their_modules():
    """The plan holds the weights it was built from: a deepcopy gets none, and a model whose layers were replaced
    (e.g. paired) after it was built runs its modules."""
    import copy

    from splitserve.engine.layer_parallel import pair_layers

    model = _model(torch.float32)
    model.step_plan = StepPlan.build(model)
    assert copy.deepcopy(model).step_plan is None
    paired = pair_layers(model, (0, 2))
    plain = pair_layers(_model(torch.float32), (0, 2))
    shape = (CFG.num_hidden_layers, 2, 12, BLOCK, CFG.num_key_value_heads, CFG.head_dim)
    with torch.inference_mode():
        got = _step(paired, torch.zeros(shape), [3, 20])
        expected = _step(plain, torch.zeros(shape), [3, 20])
    assert torch.equal(got, expected)


def test_kv_views_follow_the_cache_and_are_not_copied():
    """The model keeps its per-layer views of the last KV cache it ran on: another cache gets its own views, and
    a copy or pickle of the model never carries the cache tensor along."""
    import copy
    import pickle

    model = _model(torch.float32)
    a, b = (torch.zeros(CFG.num_hidden_layers, 2, 4, BLOCK, CFG.num_key_value_heads, CFG.head_dim)
            for _ in range(2))
    views = model._kv_layers(a)
    assert [v.data_ptr() for v in views] == [a[i].data_ptr() for i in range(CFG.num_hidden_layers)]
    assert model._kv_layers(a) is views
    assert [v.data_ptr() for v in model._kv_layers(b)] == [b[i].data_ptr() for i in range(CFG.num_hidden_layers)]
    assert copy.deepcopy(model)._kv_views.kv is None
    assert pickle.loads(pickle.dumps(model._kv_views)).kv is None
