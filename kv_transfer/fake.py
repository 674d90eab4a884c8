"""The `fake` transport: no bytes move; every transfer succeeds at its first poll, or fails with probability
`KVTransferConfig.fake_failure_probability` (seeded by `fake_seed`) so schedulers can be tested against faults.

Blocks are still allocated and freed exactly like the real backends, so block accounting can be asserted.
"""

from __future__ import annotations

import random
from typing import Sequence

from .base import KVReceiver, KVSender, KVTransferBackend
from .block_pool import BlockPool
from .config import KVTransferConfig
from .lifecycle import Lifecycle
from .messages import TransferSpec, TransferStatus


class _FakeEnd:
    def __init__(self, life: Lifecycle, doomed: bool, probability: float) -> None:
        self._life, self._doomed, self._p = life, doomed, probability

    def _poll(self) -> TransferStatus:
        if not self._life.terminal:
            if self._doomed:
                self._life.fail(f"fake failure (failure_probability={self._p})")
            else:
                self._life.advance(TransferStatus.DONE)
        return self._life.poll()


class FakeSender(_FakeEnd, KVSender):
    def __init__(self, spec: TransferSpec, life: Lifecycle, doomed: bool, p: float, num_layers: int) -> None:
        super().__init__(life, doomed, p)
        self.spec, self._num_layers = spec, num_layers

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def layer_ready(self, layer: int, tokens_ready: int | None = None) -> None:
        if not 0 <= layer < self._num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self._num_layers})")

    def poll(self) -> TransferStatus:
        return self._poll()

    def abort(self, reason: str = "aborted by sender") -> None:
        self._life.fail(reason)
        self._life.poll()

    @property
    def error(self) -> str | None:
        return self._life.error


class FakeReceiver(_FakeEnd, KVReceiver):
    def __init__(self, spec: TransferSpec, life: Lifecycle, doomed: bool, p: float, table: list[int],
                 num_layers: int) -> None:
        super().__init__(life, doomed, p)
        self.spec, self._table, self._num_layers = spec, table, num_layers

    @property
    def block_table(self) -> list[int]:
        return list(self._table)

    def completed_layers(self) -> list[int]:
        return list(range(self._num_layers)) if self._life.status is TransferStatus.DONE else []

    def poll(self) -> TransferStatus:
        return self._poll()

    def abort(self, reason: str = "aborted by receiver") -> None:
        self._life.fail(reason)
        self._life.poll()

    def transfer_seconds(self) -> float | None:
        return self._life.transfer_seconds()

    @property
    def error(self) -> str | None:
        return self._life.error


class FakeBackend(KVTransferBackend):
    name = "fake"

    def __init__(self, config: KVTransferConfig, pool: BlockPool) -> None:
        super().__init__(config, pool)
        self._rng = random.Random(config.fake_seed)

    def _doomed(self) -> bool:
        return self._rng.random() < self.config.fake_failure_probability

    def _timeout(self, spec: TransferSpec) -> float:
        return spec.timeout_s or self.config.timeout_s

    def create_sender(self, spec: TransferSpec, src_block_ids: Sequence[int]) -> KVSender:
        _, layout = self._registered(spec, sending=True)
        src = self._source_blocks(spec, layout, src_block_ids)
        life = Lifecycle(f"fake sender {spec.key}", self._timeout(spec), self.pool, src,
                         free_on_done=True)
        return FakeSender(spec, life, self._doomed(), self.config.fake_failure_probability, layout.num_layers)

    def create_receiver(self, spec: TransferSpec, cached_block_ids: Sequence[int] = ()) -> KVReceiver:
        _, layout = self._registered(spec, sending=False)
        table, new = self._allocate_destination(spec, layout, cached_block_ids)
        life = Lifecycle(f"fake receiver {spec.key}", self._timeout(spec), self.pool, new, free_on_done=False)
        return FakeReceiver(spec, life, self._doomed(), self.config.fake_failure_probability,
                            table, layout.num_layers)
