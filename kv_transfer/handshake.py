"""The handshake: what each side states about its KV, and the check that refuses a mismatch before any page moves."""

from __future__ import annotations

import torch

from splitserve.engine.kv_layout import KVLayout, fingerprint
from splitserve.proto.v1 import kv_transfer_pb2 as pb

# Fields that must agree for pages to be interchangeable (tp_size/tp_rank may differ: heads are resharded).
COMPARED_FIELDS = ("model_id", "dtype", "num_layers", "block_size", "total_kv_heads", "head_dim")
# The page wire format, part of the fingerprint: "pairs" = one [count, 2, ...] payload per run (K and V of a page
# side by side); peers of a version that sent K and V separately are refused at the handshake.
PAGE_FORMAT = "pairs"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layout_info(layout: KVLayout, model_id: str) -> pb.KVLayoutInfo:
    dtype = dtype_name(layout.dtype)
    return pb.KVLayoutInfo(
        model_id=model_id, dtype=dtype, num_layers=layout.num_layers, block_size=layout.block_size,
        total_kv_heads=layout.total_kv_heads, head_dim=layout.head_dim, tp_size=layout.tp_size,
        tp_rank=layout.tp_rank,
        fingerprint=fingerprint(model_id, dtype, layout.num_layers, layout.block_size, layout.total_kv_heads,
                                layout.head_dim, PAGE_FORMAT),
    )


def mismatch(sender: pb.KVLayoutInfo, receiver: pb.KVLayoutInfo) -> str | None:
    """None when the two sides' KV is interchangeable, else a message naming every field that differs."""
    diffs = [f"{f}: sender={getattr(sender, f)!r} receiver={getattr(receiver, f)!r}"
             for f in COMPARED_FIELDS if getattr(sender, f) != getattr(receiver, f)]
    if not diffs and sender.fingerprint != receiver.fingerprint:
        diffs.append(f"fingerprint: sender={sender.fingerprint} receiver={receiver.fingerprint}")
    if not diffs:
        return None
    return "KV fingerprint mismatch, transfer refused before any page moved (" + "; ".join(diffs) + ")"
