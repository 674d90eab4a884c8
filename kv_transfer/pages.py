"""Moving pages in and out of the KV tensor: gather on the sender, scatter on the receiver, and which pages are ready.

One page = `kv_cache[layer, :, block_id]` (see engine/kv_layout.py), stored with its K and V side by side. A
message carries `count` pages of one layer as one contiguous `[count, 2, block_size, heads, head_dim]` tensor
(the layer's `pair_view` order). When the blocks form one contiguous run and every local head is sent, the message is
a view of the KV tensor itself (no copy), on both ends.
"""

from __future__ import annotations

import bisect
import math

import torch

from splitserve.engine.kv_layout import pair_view


def is_run(block_ids: list[int]) -> bool:
    return all(b == block_ids[0] + i for i, b in enumerate(block_ids))


def run_view(kv_cache: torch.Tensor, layer: int, start: int, count: int) -> torch.Tensor | None:
    """Blocks [start, start + count) of `layer`, every local head, as a view; None if it is not contiguous
    (a cache not laid out by `KVLayout.allocate`)."""
    view = pair_view(kv_cache, layer)[start:start + count]
    return view if view.is_contiguous() else None


def gather(kv_cache: torch.Tensor, layer: int, block_ids: list[int], heads: slice) -> torch.Tensor:
    """K and V of `block_ids` (local head slice `heads`) as one contiguous `[n, 2, bs, heads, D]` tensor; a view
    when possible."""
    if heads.start == 0 and heads.stop == kv_cache.shape[4] and is_run(block_ids):
        view = run_view(kv_cache, layer, block_ids[0], len(block_ids))
        if view is not None:
            return view
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    return pair_view(kv_cache, layer)[:, :, :, heads].index_select(0, idx).contiguous()


def scatter(kv_cache: torch.Tensor, layer: int, block_ids: list[int], heads: slice, pages: torch.Tensor) -> None:
    """Write received `[n, 2, bs, heads, D]` pages into `block_ids`' local head slice `heads`."""
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    pair_view(kv_cache, layer)[:, :, :, heads].index_copy_(0, idx, pages)


def ready_blocks(num_tokens: int, tokens_ready: int, block_size: int) -> int:
    """Logical blocks whose KV is final once `tokens_ready` positions are computed (the last, partial block
    only counts when the whole sequence is done)."""
    if tokens_ready >= num_tokens:
        return math.ceil(num_tokens / block_size)
    return tokens_ready // block_size


def next_range(needed: list[int], already: int, num_ready_blocks: int) -> tuple[int, int]:
    """[first, end) positions in the ascending `needed` list that became sendable; `already` were sent."""
    return already, max(already, bisect.bisect_left(needed, num_ready_blocks))


class LayerFences:
    """Orders the transfer after the compute that wrote a layer's KV.

    The model runner calls `record(layer)` on its compute stream (inside `layer_ready`); the link thread calls
    `wait(layer, stream)` on its own stream before reading the pages. On CPU both are no-ops: the KV is written
    synchronously before `layer_ready` returns.
    """

    def __init__(self, device: torch.device, num_layers: int) -> None:
        self._cuda = device.type == "cuda"
        self._events: list[object | None] = [None] * num_layers

    def record(self, layer: int) -> None:
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record()
            self._events[layer] = ev

    def wait(self, layer: int, stream: object | None) -> None:
        ev = self._events[layer]
        if ev is not None and stream is not None:
            stream.wait_event(ev)


def side_stream(device: torch.device) -> object | None:
    """A dedicated CUDA stream for a link thread (None on CPU)."""
    return torch.cuda.Stream(device=device) if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    """Wait for this thread's stream (the link's side stream on CUDA) so scattered pages are really in place."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
