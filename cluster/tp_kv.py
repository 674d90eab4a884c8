"""KV transfer of a tensor-parallel worker: every rank moves its own KV-head shard (resharded by kv_transfer).

Rank 0 (the worker actor) owns the block manager and decides everything; each follower rank mirrors every
transfer end of rank 0 on its own shard, driven by typed ops that travel in order with the step messages:

    rank 0                                                   follower rank r (after the messages before it)
    kv.create_sender(spec, blocks)  local sender   -------->  StartSend(spec, blocks)       its sender, same blocks
    sender.layer_ready(l, n) during a step; at the last
      layer the step's readiness goes out  --------------->  LayersReady(key, ((l, n), ..))  after its own step ran
    kv.create_receiver(spec, cached) local receiver
      (allocates from the block manager)  ---------------->  StartRecv(spec, cached, new)   receives into them
    abort / a failed end  -------------------------------->  AbortEnd(key)
    <-------------- each follower's terminal statuses, in its long poll (RankStatus)

Rank 0's end is DONE when its own end and every follower's are DONE, FAILED as soon as one is (the others are
aborted then). A sender's source blocks stay pinned until every rank has sent its pages, so rank 0 never reuses
a block that a follower is still reading. Page streams of followers start after their step rather than per layer
(their layer readiness arrives with the next message).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

from splitserve.kv_transfer import KVReceiver, KVSender, KVTransferBackend, TransferSpec, TransferStatus

EndKey = tuple[str, str, int]            # ("send" | "recv", request id, attempt)
GRACE_S = 5.0                            # how long past its deadline rank 0 waits for a follower's verdict


def end_key(kind: str, spec: TransferSpec) -> EndKey:
    return (kind, spec.request_id, spec.attempt)


# ---- ops: rank 0 -> followers ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StartSend:
    spec: TransferSpec
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StartRecv:
    spec: TransferSpec
    cached_block_ids: tuple[int, ...]
    new_block_ids: tuple[int, ...]       # what rank 0's pool allocated: the follower receives into the same ids


@dataclass(frozen=True, slots=True)
class LayersReady:
    key: EndKey
    layers: tuple[tuple[int, int], ...]  # (layer, tokens ready)


@dataclass(frozen=True, slots=True)
class AbortEnd:
    key: EndKey
    reason: str


KVOp = StartSend | StartRecv | LayersReady | AbortEnd


@dataclass(frozen=True, slots=True)
class RankStatus:
    """A follower's transfer end turned terminal."""
    key: EndKey
    rank: int
    status: TransferStatus
    error: str | None = None


class RankChannel(Protocol):
    """What the sharded ends need from rank 0's link to its followers (RayFollowers)."""

    num_followers: int

    def post(self, op: KVOp) -> None: ...              # queue an op; it leaves with the next message

    def flush(self) -> None: ...                       # send queued ops now, as their own message

    def open(self, key: EndKey) -> None: ...           # start collecting followers' statuses for `key`

    def verdicts(self, key: EndKey) -> dict[int, RankStatus]: ...   # terminal statuses so far, by rank

    def close(self, key: EndKey) -> None: ...          # forget `key`


# ---- rank 0 ------------------------------------------------------------------------------------------------------
class _ShardedEnd:
    def __init__(self, local, key: EndKey, channel: RankChannel, timeout_s: float) -> None:
        self.local, self.key, self.channel = local, key, channel
        self.spec = local.spec
        self.deadline = time.monotonic() + timeout_s + GRACE_S
        self.status: TransferStatus | None = None
        self._error: str | None = None

    def _peek(self) -> TransferStatus:
        """The local end's status without releasing its blocks (torch_dist / local keep it in `life`)."""
        life = getattr(self.local, "life", None)
        return life.status if life is not None else self.local.poll()

    def poll(self) -> TransferStatus:
        if self.status is not None:
            return self.status
        verdicts = self.channel.verdicts(self.key)
        failed = [v for v in verdicts.values() if v.status is TransferStatus.FAILED]
        if failed and not self._peek().terminal:
            self.local.abort(f"tensor-parallel rank {failed[0].rank}: {failed[0].error}")
        elif not failed and not self._peek().terminal and time.monotonic() > self.deadline:
            self.local.abort("deadline passed")
        local = self._peek()
        if local is TransferStatus.FAILED or failed:
            self._finish(TransferStatus.FAILED, self.local.error or failed[0].error)
            return self.local.poll()          # gives the local blocks back
        if local is TransferStatus.DONE:
            if len(verdicts) == self.channel.num_followers:
                self._finish(TransferStatus.DONE, None)
                return self.local.poll()      # a sender's source blocks go back only now
            if time.monotonic() > self.deadline:   # like a lease expiring: the followers are told to stop
                self._finish(TransferStatus.FAILED, "a tensor-parallel rank did not finish its shard in time")
                self.local.poll()
                return TransferStatus.FAILED
            return TransferStatus.TRANSFERRING
        return local

    def _finish(self, status: TransferStatus, error: str | None) -> None:
        self.status, self._error = status, error
        if status is TransferStatus.FAILED:
            self.channel.post(AbortEnd(self.key, error or "failed"))
            self.channel.flush()
        self.channel.close(self.key)

    def abort(self, reason: str = "aborted") -> None:
        self.local.abort(reason)
        if self.status is None:
            self._finish(TransferStatus.FAILED, reason)
        self.local.poll()

    @property
    def error(self) -> str | None:
        return self._error or self.local.error


class ShardedSender(_ShardedEnd, KVSender):
    def __init__(self, local: KVSender, channel: RankChannel, timeout_s: float) -> None:
        super().__init__(local, end_key("send", local.spec), channel, timeout_s)
        self._pending: dict[int, int] = {}

    @property
    def num_layers(self) -> int:
        return self.local.num_layers

    def layer_ready(self, layer: int, tokens_ready: int | None = None) -> None:
        self.local.layer_ready(layer, tokens_ready)
        tokens = self.spec.num_tokens if tokens_ready is None else tokens_ready
        self._pending[layer] = max(self._pending.get(layer, 0), tokens)
        if layer == self.num_layers - 1:      # the step's last layer: the followers' step is done before this
            self.channel.post(LayersReady(self.key, tuple(sorted(self._pending.items()))))
            self.channel.flush()
            self._pending = {}


class ShardedReceiver(_ShardedEnd, KVReceiver):
    def __init__(self, local: KVReceiver, channel: RankChannel, timeout_s: float) -> None:
        super().__init__(local, end_key("recv", local.spec), channel, timeout_s)

    @property
    def block_table(self) -> list[int]:
        return self.local.block_table

    def completed_layers(self) -> list[int]:
        return self.local.completed_layers()


class ShardedKVBackend(KVTransferBackend):
    """Rank 0's backend: its own transfer ends, mirrored on every follower rank through `channel`."""

    name = "tp"

    def __init__(self, local: KVTransferBackend, channel: RankChannel) -> None:
        super().__init__(local.config, local.pool)
        self.local, self.channel = local, channel
        self.kv_cache, self.layout = local.kv_cache, local.layout

    def register_kv_cache(self, kv_cache, layout) -> None:
        self.local.register_kv_cache(kv_cache, layout)
        self.kv_cache, self.layout = kv_cache, layout

    def _timeout(self, spec: TransferSpec) -> float:
        return spec.timeout_s or self.config.timeout_s

    def create_sender(self, spec: TransferSpec, src_block_ids: Sequence[int]) -> KVSender:
        local = self.local.create_sender(spec, src_block_ids)
        self.channel.open(end_key("send", spec))
        self.channel.post(StartSend(spec, tuple(src_block_ids)))
        self.channel.flush()
        return ShardedSender(local, self.channel, self._timeout(spec))

    def create_receiver(self, spec: TransferSpec, cached_block_ids: Sequence[int] = ()) -> KVReceiver:
        local = self.local.create_receiver(spec, cached_block_ids)
        cached = tuple(cached_block_ids)
        self.channel.open(end_key("recv", spec))
        self.channel.post(StartRecv(spec, cached, tuple(local.block_table[len(cached):])))
        self.channel.flush()
        return ShardedReceiver(local, self.channel, self._timeout(spec))

    def reclaim(self) -> None:
        self.local.reclaim()           # followers' pools free nothing: rank 0's block manager owns the ids

    def close(self) -> None:
        self.local.close()


# ---- followers ---------------------------------------------------------------------------------------------------
class DictatedPool:
    """A follower's block pool: rank 0's block manager decides; allocation hands out the ids it chose and a
    free gives nothing back (rank 0 frees the same ids in its own pool)."""

    def __init__(self) -> None:
        self._next: list[int] = []

    def dictate(self, block_ids: Sequence[int]) -> None:
        self._next = list(block_ids)

    @property
    def num_free(self) -> int:
        return len(self._next)

    def allocate(self, n: int) -> list[int]:
        if n != len(self._next):
            raise ValueError(f"follower asked for {n} blocks, rank 0 allocated {len(self._next)}")
        ids, self._next = self._next, []
        return ids

    def free(self, block_ids: list[int]) -> None:
        pass


class FollowerKV:
    """A follower rank's transfer ends, created and driven by rank 0's ops; `poll` reports terminal ones."""

    def __init__(self, backend: KVTransferBackend, pool: DictatedPool, rank: int) -> None:
        self.backend, self.pool, self.rank = backend, pool, rank
        self.ends: dict[EndKey, KVSender | KVReceiver] = {}
        self._reports: list[RankStatus] = []

    def apply(self, op: KVOp) -> None:
        if isinstance(op, LayersReady):
            end = self.ends.get(op.key)
            for layer, tokens in op.layers if end is not None else ():
                end.layer_ready(layer, tokens)
        elif isinstance(op, AbortEnd):
            end = self.ends.pop(op.key, None)
            if end is not None:
                end.abort(op.reason)
                end.poll()
        else:
            kind = "send" if isinstance(op, StartSend) else "recv"
            key = end_key(kind, op.spec)
            try:
                if isinstance(op, StartSend):
                    self.ends[key] = self.backend.create_sender(op.spec, list(op.block_ids))
                else:
                    self.pool.dictate(op.new_block_ids)
                    self.ends[key] = self.backend.create_receiver(op.spec, list(op.cached_block_ids))
            except Exception as e:   # noqa: BLE001 - rank 0 learns it as a failed end
                self._reports.append(RankStatus(key, self.rank, TransferStatus.FAILED, f"{type(e).__name__}: {e}"))

    def poll(self) -> list[RankStatus]:
        """Terminal statuses since the last call (each end reported once, then forgotten)."""
        out, self._reports = self._reports, []
        for key, end in list(self.ends.items()):
            status = end.poll()
            if status.terminal:
                del self.ends[key]
                out.append(RankStatus(key, self.rank, status, end.error))
        return out

    def close(self) -> None:
        self.backend.close()
