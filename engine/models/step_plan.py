"""A CPU step's layer loop bound once: the model's ops without the nn.Module dispatch around them.

A CPU decode step of a small model is dispatch-bound between its matmuls: through the modules each of a layer's
~8 ops costs a few microseconds more in Python (module calls, attribute lookups, per-call dtype and backend
checks) than the op itself, ~3 ms of a 36 ms bfloat16 step at batch 8 for SmolLM2-135M. `StepPlan` binds each
layer's weights and kernels once (the modules' own `kernels`, `act_kernel`, `linear_kernel`) and runs the same
ops, with the same roundings, in a plain loop:

    h = add_and_norm(x, d);  o = rope_store_attention(qkv(h), ...)
    h = add_and_norm(x, o_proj(o));  d = down(act(gate_up(h)))

Each layer's MLP output `d` is added to the residual stream by the next norm's fused add + norm (the first layer
only normalizes; the model's final norm adds the last one): one pass over x per layer less than a separate add,
with the same roundings.

It runs the steps the backend's fused rotary + KV store + attention op takes (CPU with the native kernels: decode
steps, and steps with prompt chunks, alone or beside decodes) when every layer is a plain `DecoderLayer` of plain
or packed linears (no tensor parallelism, no layer pairs); `LlamaForCausalLM.forward` runs the modules otherwise.
The model runner builds it once the model is final.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .layers import RMSNorm, RotaryEmbedding, SwiGLU, linear_kernel
from .llama import Attention, DecoderLayer, ForwardContext, LlamaForCausalLM

LayerStep = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, Callable, tuple], torch.Tensor]


class StepPlan:
    def __init__(self, source: nn.ModuleList, layers: list[LayerStep], num_heads: int,
                 final_add_and_norm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.source = source            # the model's layers when bound: a model whose layers were replaced since
        self.layers = layers            # (e.g. paired) runs its modules
        self.num_heads = num_heads
        self.final_add_and_norm = final_add_and_norm   # the model's final norm, with the last residual add

    def __deepcopy__(self, memo: dict) -> None:
        """A copy of the model gets no plan (the steps would still hold the original's weights): it runs its
        modules until its owner builds one for it."""
        return None

    @classmethod
    def build(cls, model: LlamaForCausalLM) -> "StepPlan | None":
        """The plan of `model` as it is now (bind after every transform and after packing), or None if a layer
        is not a plain DecoderLayer."""
        like = model.embed_tokens.weight
        layers = [_bind_layer(layer, like) for layer in model.layers]
        if not layers or any(step is None for step in layers) or type(model.norm) is not RMSNorm:
            return None
        return cls(model.layers, layers, model.layers[0].self_attn.num_heads, model.norm.kernels()[1])

    def run(self, layers: nn.ModuleList, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
            kv_layers: Sequence[torch.Tensor], kv_ids: Sequence[int], ctx: ForwardContext) -> torch.Tensor | None:
        """All layers over the residual stream `x` (updated in place), then the model's final norm: returns the
        normalized hidden states; None, having done nothing, if the backend has no fused attention op for this step
        or `layers` are not the ones the plan was built from."""
        if layers is not self.source:
            return None
        fused = ctx.fused_attention(x.dtype, self.num_heads, kv_layers[0])
        if fused is None:
            return None
        cos, signed_sin = rotary.tables(positions, x.dtype)
        meta = ctx.meta
        step = (cos, signed_sin, meta.slot_mapping, meta.block_tables, meta.context_lens_t)
        done = ctx.on_layer_done
        delta = None                    # the previous layer's MLP output, not yet added to x
        for layer, kv_layer, kv_id in zip(self.layers, kv_layers, kv_ids):
            delta = layer(x, delta, kv_layer, fused, step)
            if done is not None:
                done(kv_id)
        return self.final_add_and_norm(x, delta)


def _bind_layer(layer: DecoderLayer, like: torch.Tensor) -> LayerStep | None:
    """DecoderLayer.forward with the fused attention op, bound to `layer`'s weights; None if `layer` is anything
    else."""
    if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention or type(layer.mlp) is not SwiGLU \
            or type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    linears = [linear_kernel(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(f is None for f in linears):
        return None
    qkv, o_proj, gate_up, down = linears
    norm, add_and_norm_in = layer.input_layernorm.kernels()
    _, add_and_norm = layer.post_attention_layernorm.kernels()
    act = mlp.act_kernel(like)
    heads, scale = attn.num_heads, attn.scale

    def step(x: torch.Tensor, delta: torch.Tensor | None, kv_layer: torch.Tensor, fused: Callable,
             rope_and_slots: tuple) -> torch.Tensor:
        """The layer on x + delta (added to x in place); returns its MLP output, which the caller adds next."""
        cos, signed_sin, slots, tables, lens = rope_and_slots
        h = norm(x) if delta is None else add_and_norm_in(x, delta)
        o = fused(qkv(h), cos, signed_sin, kv_layer, slots, tables, lens, heads, scale)
        h = add_and_norm(x, o_proj(o))
        return down(act(gate_up(h)))
    return step
