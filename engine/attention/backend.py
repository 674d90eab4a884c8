"""Choosing the attention backend: `get_attention_backend(name, device)`.

Backends (every callable has the `torch_ref` signature):
  "torch"  - the torch reference (`torch_ref`): the default on CPU.
  "triton" - the Triton kernels (`triton_kernels`): the default on CUDA. On a CPU device it only runs under
             Triton's interpreter, i.e. with TRITON_INTERPRET=1 set before the process imports triton.
  "auto"   - "triton" on CUDA when triton is installed, else "torch".

Triton is imported lazily, so importing this module never needs triton.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from splitserve.settings import settings

from . import torch_ref
from .metadata import AttentionMetadata

StoreKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
PagedAttention = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]
# (dtype, num_heads, kv_layer, meta) -> the fused op for this step, or None (see torch_ref.rope_store_attention_op)
RopeStoreAttentionOp = Callable[[torch.dtype, int, torch.Tensor, AttentionMetadata], Callable | None]

BACKEND_NAMES = ("torch", "triton", "auto")


@dataclass(frozen=True, slots=True)
class AttentionBackend:
    name: str
    store_kv: StoreKV              # (k, v, kv_layer, slot_mapping) -> None
    paged_attention: PagedAttention  # (q, kv_layer, meta, scale) -> out; decode or prefill by meta.is_decode_only
    # optional: gives the op that does a step's rotary, store_kv and paged_attention in one call, from the fused
    # qkv projection, or None where it does not apply (then the model runs the three steps)
    rope_store_attention_op: RopeStoreAttentionOp | None = None


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _torch_backend() -> AttentionBackend:
    return AttentionBackend(name="torch", store_kv=torch_ref.store_kv, paged_attention=torch_ref.paged_attention,
                            rope_store_attention_op=torch_ref.rope_store_attention_op)


def _triton_backend(device: torch.device) -> AttentionBackend:
    if device.type != "cuda" and not settings.triton_interpret:
        raise ValueError(
            f"the triton attention backend needs a CUDA device, or TRITON_INTERPRET=1 (set before the process "
            f"starts) to interpret its kernels on {device.type}; got device {device}")
    if not _triton_available():
        raise ValueError("the triton attention backend needs triton: pip install 'splitserve[triton]'")
    from . import triton_kernels   # imports triton; TRITON_INTERPRET is read by triton at that point

    return AttentionBackend(name="triton", store_kv=triton_kernels.store_kv,
                            paged_attention=triton_kernels.paged_attention)


def get_attention_backend(name: str = "auto", device: torch.device | str = "cpu") -> AttentionBackend:
    """The backend called `name` ("torch", "triton" or "auto") for tensors on `device`."""
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "torch":
        return _torch_backend()
    if name == "triton":
        return _triton_backend(device)
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
