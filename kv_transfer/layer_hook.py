"""The model runner's side of layer-wise streaming.

The runner owns the forward pass; after layer l's attention wrote its KV for this step's tokens it calls the
hook, and each sender queues those pages while layer l+1 computes (the sends run on link threads):

    streamer = LayerStreamer()
    streamer.add(tx, tokens_ready=chunk_end)     # per prefilling request in this step (chunk_end: its progress)
    model.forward(batch, on_layer_done=streamer) # the runner calls streamer(l) after layer l
    streamer.clear()                             # next step builds a new set
"""

from __future__ import annotations

from .base import KVSender


class LayerStreamer:
    def __init__(self) -> None:
        self._senders: list[tuple[KVSender, int | None]] = []

    def add(self, sender: KVSender, tokens_ready: int | None = None) -> None:
        """`tokens_ready`: positions [0, tokens_ready) of the request are computed after this step."""
        self._senders.append((sender, tokens_ready))

    def clear(self) -> None:
        self._senders.clear()

    def __call__(self, layer: int) -> None:
        for sender, tokens in self._senders:
            sender.layer_ready(layer, tokens)

    def __bool__(self) -> bool:
        return bool(self._senders)
