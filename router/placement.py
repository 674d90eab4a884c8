"""Placement: which decode worker runs a request, and whether a prefill worker computes its prompt first.

Decode worker: the live, non-draining one with the fewest active requests (the router's own count, exact),
ties broken by free KV blocks. Prefill: when the part of the prompt the decode worker has not cached is at least
`local_prefill_threshold` tokens, the prefill worker with the least queued work, where work = tokens in flight
there + this prompt's tokens it has not cached (prefix overlap from the chained block hashes it advertises).
Every decision is returned with its reason, which the router counts in a metric.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.block_hash import chain_hashes


@dataclass(slots=True)
class Candidate:
    worker_id: str
    active_requests: int = 0          # router-side count of requests placed there and not finished
    inflight_tokens: int = 0          # prefill: prompt tokens handed over and not yet prefilled
    free_blocks: int = 0
    prefix_hashes: frozenset = frozenset()


@dataclass(slots=True)
class Placement:
    decode: str
    prefill: str | None
    reason: str                       # prefill_remote | decode_local_short | decode_local_cached | colocated
    cached_tokens: int = 0


def overlap_tokens(hashes: list[int], cached: frozenset, block_size: int) -> int:
    n = 0
    for h in hashes:
        if h not in cached:
            break
        n += 1
    return n * block_size


def place(token_ids: list[int], decode: list[Candidate], prefill: list[Candidate], block_size: int, salt: int,
          local_prefill_threshold: int, colocated: bool = False) -> Placement:
    if not decode:
        raise LookupError("no live decode worker")
    d = min(decode, key=lambda c: (c.active_requests, -c.free_blocks, c.worker_id))
    if colocated:
        return Placement(d.worker_id, None, "colocated")
    hashes = chain_hashes(token_ids, block_size, salt)
    d_cached = overlap_tokens(hashes, d.prefix_hashes, block_size)
    uncached = len(token_ids) - d_cached
    if not prefill or uncached < local_prefill_threshold:
        reason = "decode_local_cached" if d_cached and uncached < local_prefill_threshold else "decode_local_short"
        return Placement(d.worker_id, None, reason, d_cached)

    def work(c: Candidate) -> tuple:
        return (c.inflight_tokens + len(token_ids) - overlap_tokens(hashes, c.prefix_hashes, block_size), c.worker_id)

    p = min(prefill, key=work)
    return Placement(d.worker_id, p.worker_id, "prefill_remote", overlap_tokens(hashes, p.prefix_hashes, block_size))
