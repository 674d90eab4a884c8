"""A Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over a paged KV cache.

The model knows nothing of tensor parallelism, KV transfer or scheduling: it reads a `ForwardContext`
(the KV cache, the batch's attention metadata and backend) and calls `ctx.on_layer_done(i)` after layer i's KV
is stored, which is where layer-wise KV streaming hooks in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..attention.backend import AttentionBackend
from ..attention.metadata import AttentionMetadata
from ..model_config import ModelConfig
from .layers import RMSNorm, RotaryEmbedding, SwiGLU


@dataclass(slots=True)
class ForwardContext:
    kv_cache: torch.Tensor                     # [num_layers, 2, blocks, block_size, kv_heads, head_dim]
    meta: AttentionMetadata
    backend: AttentionBackend
    on_layer_done: Callable[[int], None] | None = None

    def fused_attention(self, dtype: torch.dtype, num_heads: int, kv_layer: torch.Tensor) -> Callable | None:
        """The backend's rotary + KV store + attention op for this step, or None (see AttentionBackend)."""
        get = self.backend.rope_store_attention_op
        return None if get is None else get(dtype, num_heads, kv_layer, self.meta)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_layer: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if (fused := ctx.fused_attention(qkv.dtype, self.num_heads, kv_layer)) is not None:   # one call on CPU
            cos, signed_sin = rotary.tables(positions, qkv.dtype)
            meta = ctx.meta
            return self.o_proj(fused(qkv, cos, signed_sin, kv_layer, meta.slot_mapping, meta.block_tables,
                                     meta.context_lens_t, self.num_heads, self.scale))
        q_heads, qk_heads = self.num_heads, self.num_heads + self.num_kv_heads
        qkv = qkv.view(-1, qk_heads + self.num_kv_heads, self.head_dim)
        qk = rotary.rotate(positions, qkv[:, :qk_heads])       # q and k heads rotated in one pass
        q, k, v = qk[:, :q_heads], qk[:, q_heads:], qkv[:, qk_heads:]
        ctx.backend.store_kv(k, v, kv_layer, ctx.meta.slot_mapping)
        o = ctx.backend.paged_attention(q.contiguous(), kv_layer, ctx.meta, self.scale)
        return self.o_proj(o.reshape(-1, q_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_layer: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Updates the residual stream `x` in place (and returns it)."""
        attn = self.self_attn(self.input_layernorm(x), positions, rotary, kv_layer, ctx)
        h = self.post_attention_layernorm.add_and_norm(x, attn)      # x += attn, then normalized
        return x.add_(self.mlp(h))


class _ViewCache:
    """The per-layer views of one KV cache tensor. A copied or pickled model starts empty (never a copy of the
    cache tensor)."""

    __slots__ = ("kv", "ids", "views")

    def __init__(self) -> None:
        self.kv, self.ids, self.views = None, (), []

    def __deepcopy__(self, memo: dict) -> "_ViewCache":
        return _ViewCache()

    def __reduce__(self):
        return (_ViewCache, ())


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        # which KV-cache layer each module in self.layers writes; layer-parallel pairs rewrite this
        self.kv_layer_ids: list = list(range(cfg.num_hidden_layers))
        # CPU steps without the module dispatch (models/step_plan.py); the model runner sets it once the
        # model is final (transformed, packed): it binds the weights as they are then (a deepcopy has none)
        self.step_plan = None
        self._kv_views = _ViewCache()          # per-layer views of the last forward's KV cache
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Returns final hidden states [T, hidden]; `compute_logits` turns the rows you need into logits."""
        x = self.embed_tokens(input_ids)
        kv_layers = self._kv_layers(ctx.kv_cache)
        if self.step_plan is not None and (y := self.step_plan.run(self.layers, x, positions, self.rotary,
                                                                       kv_layers, self.kv_layer_ids, ctx)) is not None:
            return y                    # the plan ends with the final norm
        for layer, kv_id, kv_layer in zip(self.layers, self.kv_layer_ids, kv_layers):
            x = layer(x, positions, self.rotary, kv_layer, ctx)
            if ctx.on_layer_done is not None:
                for done in (kv_id,) if isinstance(kv_id, int) else kv_id:
                    ctx.on_layer_done(done)
        return self.norm(x)

    def _kv_layers(self, kv: torch.Tensor) -> list[torch.Tensor]:
        """The views of `kv` each module in self.layers writes, made once per cache (30 indexing ops a step)."""
        ids = tuple(i if isinstance(i, int) else tuple(i) for i in self.kv_layer_ids)
        cache = self._kv_views
        if cache.kv is not kv or cache.ids != ids:
            cache.views = [kv[i] if isinstance(i, int) else kv[i[0]:i[-1] + 1] for i in self.kv_layer_ids]
            cache.kv, cache.ids = kv, ids
        return cache.views

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Logits of `hidden`'s rows, in float32 (upcast=False: in the model dtype, e.g. for a greedy argmax,
        which the exact bfloat16 -> float32 upcast cannot change)."""
        logits = self.lm_head(hidden)
        return logits.float() if upcast else logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take HF-named tensors; q/k/v and gate/up are packed into their fused projections."""
        params = dict(self.named_parameters())
        packed = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                  "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        seen: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if "rotary_emb" in name:
                continue
            leaf = name.split(".")[-2]
            if leaf in packed:
                fused, shard = packed[leaf]
                target = name.replace(leaf, fused)
                self._load_shard(params[target], tensor, fused, shard)
            else:
                target = name
                if target not in params:
                    raise ValueError(f"unexpected weight {name!r} for a Llama model")
                params[target].data.copy_(tensor)
            seen.add(target)
        if self.config.tie_word_embeddings:      # re-tie: moving a meta-built model to a device unties it
            self.lm_head.weight = self.embed_tokens.weight
        missing = set(params) - seen - ({"lm_head.weight"} if self.config.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:5]}")

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, fused: str, shard: int) -> None:
        cfg = self.config
        if fused == "qkv_proj":
            sizes = [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2
        else:
            sizes = [cfg.intermediate_size] * 2
        start = sum(sizes[:shard])
        if tensor.shape[0] != sizes[shard]:
            raise ValueError(f"{fused} shard {shard} has {tensor.shape[0]} rows, expected {sizes[shard]}")
        param.data[start:start + sizes[shard]].copy_(tensor)
