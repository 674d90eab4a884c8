"""Building blocks of a Llama-family decoder: RMSNorm, rotary embedding, SwiGLU, and pre-packed CPU linears."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.cpu_kernels import native_ops


def _native_layers(x: torch.Tensor, dtype: torch.dtype):
    """The native layer ops when `x` is a CPU tensor of `dtype` and they could be built; else None."""
    return native_ops() if x.dtype == dtype and x.device.type == "cpu" else None


def fused_bf16_ops(x: torch.Tensor):
    """The native fused layers (`cpu_layers.cpp`) for bfloat16 CPU tensors, when they could be built; else None.
    float32 must match HF exactly: it takes the ATen formulas, or in the decode plan (`kernels`, `act_kernel`)
    native ops that give the same bits (`_f32_ops`)."""
    return _native_layers(x, torch.bfloat16)


def _f32_ops(x: torch.Tensor):
    """The native float32 layers (`cpu_layers_f32.cpp`: the ATen formulas bit for bit, fewer passes) for float32
    CPU tensors, when they could be built; else None."""
    return _native_layers(x, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := fused_bf16_ops(x)) is not None:      # same formula in one pass (8 ATen ops otherwise)
            return ops.rms_norm(x, self.weight, self.eps)
        return _aten_rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The residual add then the norm: `x += delta` in place, returns RMSNorm(x) (one pass in bfloat16)."""
        if x.is_contiguous() and (ops := fused_bf16_ops(x)) is not None:
            return ops.add_rms_norm(x, delta, self.weight, self.eps)
        return self.forward(x.add_(delta))

    def kernels(self) -> tuple[Callable, Callable]:
        """(forward, add_and_norm) for contiguous activations of the weight's dtype, bound once: the same ops
        without the module call and the per-call dtype checks (`StepPlan`)."""
        w, eps = self.weight, self.eps
        if (ops := fused_bf16_ops(w)) is not None:
            norm, add_norm = ops.rms_norm.default, ops.add_rms_norm.default
            return (lambda x: norm(x, w, eps)), (lambda x, delta: add_norm(x, delta, w, eps))
        if (ops := _f32_ops(w)) is not None:
            # F.rms_norm bit for bit, the residual add folded in, with two passes over x instead of five
            f32_norm = ops.rms_norm_f32.default
            return (lambda x: f32_norm(x, None, w, eps)), (lambda x, delta: f32_norm(x, delta, w, eps))
        return (lambda x: _aten_rms_norm(x, w, eps)), (lambda x, delta: _aten_rms_norm(x.add_(delta), w, eps))


def _aten_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: float32 statistics and the same two roundings (normalize, cast, then scale). F.rms_norm is
    one fused op, bit-identical to HF's x * rsqrt(mean(x^2) + eps); in float32 the cast is a no-op and the gain
    can go into the same op (the same product of the same two floats)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Half-split (GPT-NeoX / HF Llama) rotary embedding with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self._step: tuple | None = None     # (positions, dtype, cos, signed sin) of the step being run
        if self.cos.device.type != "meta":
            self.build_tables()

    def build_tables(self) -> None:
        """(Re)compute the float32 tables; models built on the meta device call this after `to_empty`."""
        device = self.cos.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
                                         / self.head_dim))
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos()
        self.sin = emb.sin()
        self._step = None

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin rows of `positions`, [T, 1, D]: looked up once per step, not once per layer
        (every layer receives the same `positions` tensor object)."""
        step = self._step
        if step is None or step[0] is not positions or step[1] != dtype:
            half = self.head_dim // 2
            cos = self.cos[positions].unsqueeze(1).to(dtype)
            sin = self.sin[positions].unsqueeze(1).to(dtype)
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)   # rotate_half's minus sign, folded in
            step = self._step = (positions, dtype, cos, sin)
        return step[2], step[3]

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] (q and k heads may be concatenated: one pass for both).

        x * cos + rotate_half(x) * sin, with rotate_half(x) * sin == swap_halves(x) * signed_sin bit for bit."""
        cos, signed_sin = self.tables(positions, x.dtype)
        swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
        return x * cos + swapped * signed_sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, Hkv, D]."""
        return self.rotate(positions, q), self.rotate(positions, k)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := fused_bf16_ops(x)) is not None:
            return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def act_kernel(self, like: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """silu(gate) * up of the gate_up projection's output, for activations of `like`'s dtype and device."""
        if (ops := fused_bf16_ops(like)) is not None:
            return ops.silu_mul.default
        if (ops := _f32_ops(like)) is not None and torch.backends.cpu.get_cpu_capability() == "AVX512":
            return ops.silu_mul_f32.default     # ATen's formula bit for bit, with the exp its AVX-512 kernel uses
        n = self.intermediate

        def aten_act(gate_up: torch.Tensor) -> torch.Tensor:
            gate, up = gate_up.split(n, dim=-1)
            return F.silu(gate) * up
        return aten_act


# ---- pre-packed linears (CPU, bfloat16) ------------------------------------------------------------------------
class PackedLinear(nn.Module):
    """A bias-free linear whose weight was reordered once into oneDNN's blocked (AMX) layout.

    F.linear hands oneDNN a plain [out, in] weight on every call; reordered once at load (the ops inductor's
    freezing pass uses), the decode matmuls run 1.3-1.45x faster at batch 1-128 with bit-identical results. The
    packed tensor is opaque (no state_dict, no .to()), so this is done last, when the model is ready to serve.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def linear_kernel(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x -> module(x) bound once, for a PackedLinear or a plain bias-free nn.Linear; None for anything else
    (tensor-parallel linears all-reduce, so they keep their module call)."""
    if type(module) is PackedLinear:
        op, packed = torch.ops.mkldnn._linear_pointwise.default, module.packed
        return lambda x: op(x, packed, None, "none", [], "")
    if type(module) is nn.Linear and module.bias is None:
        weight = module.weight
        return lambda x: F.linear(x, weight)
    return None


def can_pack_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Packing pays off for bfloat16 on CPUs with native bf16 (AMX / AVX512-BF16). float32 keeps F.linear:
    oneDNN's float32 kernels round differently from MKL's, and float32 is the dtype that must match HF exactly."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(model: nn.Module) -> int:
    """Replace every plain bias-free nn.Linear in `model` by a PackedLinear; returns how many were replaced.
    Subclasses (e.g. tensor-parallel linears) are left alone."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(module, name, PackedLinear(child))
                count += 1
    return count
