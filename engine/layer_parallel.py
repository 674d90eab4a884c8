"""Layer-pair parallelism (arXiv 2502.02790): consecutive layers of a middle range read the same input.

For a pair (l, l+1) with input x:

    h = x + Attn_l(norm_l(x)) + Attn_l+1(norm_l+1(x))
    y = h + MLP_l(norm'_l(h)) + MLP_l+1(norm'_l+1(h))

Each layer keeps its own KV cache under its own index (`model.kv_layer_ids` gets the tuple (l, l+1), for which
the model passes the [2, 2, blocks, ...] view `kv_cache[l:l+2]` and reports both layers done).

A pair is evaluated as one layer twice as wide (`ParallelPair`). Both RMSNorms of x share one statistic and differ
only in their gains, so the gains are folded into the weight columns and x is normalized once:
    qkv    = x_hat @ [W_qkv_l * g_l ; W_qkv_l+1 * g_l+1]^T      one matmul for both layers' q, k, v
    attn   = [o_l | o_l+1] @ [W_o_l | W_o_l+1]^T                 the sum of both outputs is one matmul
and likewise gate/up (gains folded) and [W_down_l | W_down_l+1]. Under tensor parallelism the pair is built
from the already-sharded layers: each rank holds its heads and intermediate slice of *both* layers, and the two
concatenated row-parallel projections make a pair cost 2 all-reduces instead of 4. (The paper gives each rank
one whole layer's attention instead; that would leave layer l's KV on one rank only, while every other layer's
heads are split, breaking the one KV layout kv_transfer reshards by. Per-rank work and all-reduces are the same.)

Apply after `tp.shard_model`; applying it twice with the same range is a no-op.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models.layers import RotaryEmbedding, SwiGLU
from .models.llama import DecoderLayer, ForwardContext, LlamaForCausalLM
from .tp import RowParallelLinear, linear_from, weight_of

Transform = Callable[[LlamaForCausalLM], LlamaForCausalLM]


def layer_pairs(layer_range: tuple[int, int] | None, num_layers: int) -> list[tuple[int, int]]:
    """[(start, start+1), (start+2, start+3), ...] for [start, end); [] for None or an empty range."""
    if not layer_range:
        return []
    start, end = layer_range
    if not 0 <= start <= end <= num_layers or (end - start) % 2:
        raise ValueError(f"layer_parallel={start}:{end} must be an even-length range within the model's "
                         f"{num_layers} layers")
    return [(i, i + 1) for i in range(start, end, 2)]


class PairAttention(nn.Module):
    """Both layers' attention from one normalized input: one QKV matmul, attention per layer on its own KV
    cache, one output matmul over the concatenated head outputs."""

    def __init__(self, first: DecoderLayer, second: DecoderLayer) -> None:
        super().__init__()
        a, b = first.self_attn, second.self_attn
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = a.num_heads, a.num_kv_heads, a.head_dim, a.scale
        qk = (a.num_heads + a.num_kv_heads) * a.head_dim
        wa = _fold(a.qkv_proj.weight, first.input_layernorm.weight)
        wb = _fold(b.qkv_proj.weight, second.input_layernorm.weight)
        # rows [q_l, k_l, q_l+1, k_l+1, v_l, v_l+1]: both layers' q and k heads are adjacent, so RoPE is one pass
        self.qkv_proj = linear_from(torch.cat([wa[:qk], wb[:qk], wa[qk:], wb[qk:]]))
        self.o_proj = _concat_inputs(a.o_proj, b.o_proj)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_pair: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qk = h + kvh
        qkv = self.qkv_proj(x).view(-1, 2 * (qk + kvh), d)
        rotated = rotary.rotate(positions, qkv[:, :2 * qk])
        outs = []
        for i in range(2):
            q, k = rotated[:, i * qk:i * qk + h], rotated[:, i * qk + h:(i + 1) * qk]
            v = qkv[:, 2 * qk + i * kvh:2 * qk + (i + 1) * kvh]
            ctx.backend.store_kv(k, v, kv_pair[i], ctx.meta.slot_mapping)
            outs.append(ctx.backend.paged_attention(q.contiguous(), kv_pair[i], ctx.meta, self.scale))
        return self.o_proj(torch.cat(outs, dim=1).view(-1, 2 * h * d))


class ParallelPair(nn.Module):
    """Layers l and l+1 evaluated on the same input, as one wider layer (see the module docstring)."""

    def __init__(self, first: DecoderLayer, second: DecoderLayer) -> None:
        super().__init__()
        self.eps = first.input_layernorm.eps
        self.self_attn = PairAttention(first, second)
        m1, m2 = first.mlp, second.mlp
        g1, u1 = _fold(m1.gate_up_proj.weight, first.post_attention_layernorm.weight).split(m1.intermediate)
        g2, u2 = _fold(m2.gate_up_proj.weight, second.post_attention_layernorm.weight).split(m2.intermediate)
        with torch.device("meta"):
            self.mlp = SwiGLU(g1.shape[1], m1.intermediate + m2.intermediate)
        self.mlp.gate_up_proj = linear_from(torch.cat([g1, g2, u1, u2]))
        self.mlp.down_proj = _concat_inputs(m1.down_proj, m2.down_proj)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its gain (folded into the next weights); float32 statistics as in RMSNorm."""
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_pair: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = x + self.self_attn(self.normalize(x), positions, rotary, kv_pair, ctx)
        return h + self.mlp(self.normalize(h))


def _fold(weight: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """W @ diag(g): the RMSNorm gain moved into the columns of the following projection (in float32)."""
    return (weight.float() * gain.float()).to(weight.dtype)


def _concat_inputs(a: nn.Module, b: nn.Module) -> nn.Module:
    """[W_a | W_b]: x_a @ W_a^T + x_b @ W_b^T as one matmul over [x_a | x_b]; keeps a row-parallel all-reduce."""
    fused = linear_from(torch.cat([weight_of(a), weight_of(b)], dim=1))
    return RowParallelLinear(fused, a.group) if isinstance(a, RowParallelLinear) else fused


def pair_layers(model: LlamaForCausalLM, layer_range: tuple[int, int] | None) -> LlamaForCausalLM:
    """Replace each pair of `layer_range` by a ParallelPair, in place; the identity for None or an empty range."""
    pairs = layer_pairs(layer_range, len(model.layers))
    done = getattr(model, "layer_parallel", None)
    if done is not None:
        if tuple(done) != tuple(layer_range or ()):
            raise ValueError(f"model already has layer-parallel range {done}, cannot apply {layer_range}")
        return model
    if not pairs:
        return model
    starts = {p[0] for p in pairs}
    layers, kv_ids, i = [], [], 0
    while i < len(model.layers):
        if i in starts:
            layers.append(ParallelPair(model.layers[i], model.layers[i + 1]))
            kv_ids.append((model.kv_layer_ids[i], model.kv_layer_ids[i + 1]))
            i += 2
        else:
            layers.append(model.layers[i])
            kv_ids.append(model.kv_layer_ids[i])
            i += 1
    model.layers = nn.ModuleList(layers)
    model.kv_layer_ids = kv_ids
    model.layer_parallel = tuple(layer_range)
    return model


def layer_parallel_transform(layer_range: tuple[int, int] | None) -> Transform | None:
    """The `model_transform` for `EngineConfig.layer_parallel` (None when unset)."""
    if not layer_range:
        return None
    return lambda model: pair_layers(model, layer_range)


def compose(*transforms: Transform | None) -> Transform | None:
    """Apply the given transforms left to right (None entries skipped); None when there are none."""
    steps = [t for t in transforms if t is not None]
    if not steps:
        return None

    def apply(model: LlamaForCausalLM) -> LlamaForCausalLM:
        for step in steps:
            model = step(model)
        return model
    return apply
