"""Tensor parallelism for an unaware model, gpt-fast style: `shard_model` rewrites a loaded LlamaForCausalLM in place.

    qkv_proj      column-parallel: this rank's q heads and KV heads (rows of the fused weight)
    o_proj        row-parallel:    the matching input columns; output all-reduced (RowParallelLinear)
    gate_up_proj  column-parallel: this rank's slice of the intermediate dimension, gate and up alike
    down_proj     row-parallel:    the matching input columns; output all-reduced
    lm_head       vocab-parallel:  this rank's slice of the vocabulary; logits gathered at rank 0, the only
                                   rank that samples (the embedding stays replicated: a lookup costs nothing)

Heads are split by whole GQA groups: a rank holds some KV heads and exactly the q heads that read them, so the
attention code runs unchanged on fewer heads. KV heads split as evenly as they go, the first ranks taking one
more (SmolLM2's 3 KV heads at TP=2: rank 0 holds KV heads {0, 1} and q heads 0-5, rank 1 holds KV head {2} and
q heads 6-8); with fewer KV heads than ranks each KV head is replicated on tp / num_kv_heads ranks, which split
its q heads between them. `kv_heads_of_rank` is that rule; KV-cache resharding must use the same one.

One all-reduce per attention block and one per MLP, as in Megatron. Partial sums of 16-bit outputs are reduced
in float32, so TP=N rounds once where TP=1 rounds once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import dist as tp_dist
from .models.llama import Attention, DecoderLayer, LlamaForCausalLM


# ---- who holds what --------------------------------------------------------------------------------------------
def split_range(n: int, parts: int, index: int) -> range:
    """[0, n) cut into `parts` contiguous pieces as even as possible, the first `n % parts` one longer."""
    per, extra = divmod(n, parts)
    start = index * per + min(index, extra)
    return range(start, start + per + (index < extra))


def kv_heads_of_rank(total_kv_heads: int, tp: int, rank: int) -> range:
    """Global KV heads held by `rank`: split as evenly as they go, or replicated when there are fewer than ranks."""
    if total_kv_heads >= tp:
        return split_range(total_kv_heads, tp, rank)
    if tp % total_kv_heads:
        raise ValueError(f"tp={tp} must be a multiple of num_kv_heads={total_kv_heads} when it exceeds it")
    head = rank // (tp // total_kv_heads)
    return range(head, head + 1)


def q_heads_of_rank(num_heads: int, total_kv_heads: int, tp: int, rank: int) -> range:
    """Global query heads of `rank`: those of its KV heads' GQA groups (shared out when a KV head is replicated)."""
    group = num_heads // total_kv_heads
    kv = kv_heads_of_rank(total_kv_heads, tp, rank)
    if total_kv_heads >= tp:
        return range(kv.start * group, kv.stop * group)
    sharers = tp // total_kv_heads
    if group < sharers:
        raise ValueError(f"tp={tp}: KV head {kv.start}'s {group} query heads cannot be spread over {sharers} ranks")
    mine = split_range(group, sharers, rank % sharers)
    return range(kv.start * group + mine.start, kv.start * group + mine.stop)


# ---- parallel layers -------------------------------------------------------------------------------------------
def linear_from(weight: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear holding `weight` [out, in] (a plain nn.Linear, so the runner may still pack it)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    return linear


def weight_of(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or of a parallel linear wrapping one."""
    return module.linear.weight if isinstance(module, (RowParallelLinear, VocabParallelLinear)) else module.weight


class RowParallelLinear(nn.Module):
    """A linear over this rank's slice of the input features; the partial outputs are summed over the group."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.linear = linear
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if out.dtype in (torch.float16, torch.bfloat16):
            return tp_dist.all_reduce(out.float(), self.group).to(out.dtype)
        return tp_dist.all_reduce(out, self.group)


class VocabParallelLinear(nn.Module):
    """The LM head over this rank's slice of the vocabulary (zero-padded to an equal share); the full logits are
    gathered at rank 0. Other ranks get their own slice back and ignore it: only rank 0 samples."""

    def __init__(self, linear: nn.Linear, vocab_size: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.linear = linear
        self.vocab_size = vocab_size
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.linear(x)
        parts = tp_dist.gather(local, self.group, root=0)
        return local if parts is None else torch.cat(parts, dim=-1)[..., :self.vocab_size]


# ---- the transform ---------------------------------------------------------------------------------------------
def shard_model(model: LlamaForCausalLM, group: dist.ProcessGroup) -> LlamaForCausalLM:
    """Keep this rank's shard of every weight and make the row-parallel outputs all-reduce over `group`.

    Run it before the layer-parallel transform (which fuses already-sharded layers)."""
    rank, tp = group.rank(), group.size()
    cfg = model.config
    kv = kv_heads_of_rank(cfg.num_key_value_heads, tp, rank)
    q = q_heads_of_rank(cfg.num_attention_heads, cfg.num_key_value_heads, tp, rank)
    inter = split_range(cfg.intermediate_size, tp, rank)
    for i, layer in enumerate(model.layers):
        if not isinstance(layer, DecoderLayer):
            raise ValueError(f"layer {i} is a {type(layer).__name__}: apply tensor parallelism before "
                             "layer-parallel pairs")
        _shard_attention(layer.self_attn, q, kv, group)
        mlp = layer.mlp
        gate, up = mlp.gate_up_proj.weight.split(mlp.intermediate)
        mlp.gate_up_proj = linear_from(torch.cat([gate[inter.start:inter.stop], up[inter.start:inter.stop]]))
        mlp.down_proj = RowParallelLinear(linear_from(mlp.down_proj.weight[:, inter.start:inter.stop]), group)
        mlp.intermediate = len(inter)
    share = -(-cfg.vocab_size // tp)
    head = model.lm_head.weight[rank * share:(rank + 1) * share]
    if head.shape[0] < share:          # the last rank's slice of a vocabulary that does not divide evenly
        head = torch.cat([head, head.new_zeros(share - head.shape[0], head.shape[1])])
    model.lm_head = VocabParallelLinear(linear_from(head), cfg.vocab_size, group)
    model.tp_rank, model.tp_size, model.tp_group = rank, tp, group
    return model


def _shard_attention(attn: Attention, q: range, kv: range, group: dist.ProcessGroup) -> None:
    d = attn.head_dim
    w = attn.qkv_proj.weight
    q_rows = w[:attn.num_heads * d]
    k_rows = w[attn.num_heads * d:(attn.num_heads + attn.num_kv_heads) * d]
    v_rows = w[(attn.num_heads + attn.num_kv_heads) * d:]
    attn.qkv_proj = linear_from(torch.cat([q_rows[q.start * d:q.stop * d], k_rows[kv.start * d:kv.stop * d],
                                           v_rows[kv.start * d:kv.stop * d]]))
    attn.o_proj = RowParallelLinear(linear_from(attn.o_proj.weight[:, q.start * d:q.stop * d]), group)
    attn.num_heads, attn.num_kv_heads = len(q), len(kv)


def tp_transform(group: dist.ProcessGroup):
    """The `model_transform` for ModelRunner / LLMEngine on one rank of `group`."""
    return lambda model: shard_model(model, group)
