"""Placement: which decode worker runs a request, and whether a prefill worker computes its prompt first.

Decode worker: the live, non-draining one with the fewest active requests (the router's own count, exact),
ties broken by free KV blocks. Prefill: when the part of the prompt the decode worker has not cached is at least
`local_prefill_threshold` tokens, the prefill worker with the least queued work, where work = tokens in flight
there + this prompt's tokens it has not cached (prefix overlap from the chained block hashes it advertises).

Conditional disaggregation (`backlog_s`, off by default): when even that prefill worker has at least `backlog_s`
of prompts queued ahead of this one (its queued tokens over its measured prefill rate), and the decode worker
has no prompt of its own in progress, the decode worker prefills this one itself if it would be done sooner:
this prompt's uncached tokens at the decode worker's own measured prefill rate, against the queue plus this
prompt at the prefill worker's. A decode worker computes prompts beside its decodes, in chunks of at most
`--max-prefill-tokens-with-decodes` tokens where that is set, so its rate can be several times lower; until one
of its prompts has been timed, the prefill worker's rate stands in for it. A saturated prefill pool then borrows
decode capacity, one prompt per decode worker at a time, which bounds what it costs the decoding requests there.
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
    prefill_rate: float | None = None  # measured prompt tokens/s (router/admission.py LatencyModel); None: not yet
                                       # (a decode worker's: of the prompts it computed itself)


@dataclass(slots=True)
class Placement:
    decode: str
    prefill: str | None
    reason: str    # prefill_remote | decode_local_short | decode_local_cached | decode_local_backlog | colocated
    cached_tokens: int = 0


def overlap_tokens(hashes: list[int], cached: frozenset, block_size: int) -> int:
    n = 0
    for h in hashes:
        if h not in cached:
            break
        n += 1
    return n * block_size


def place(token_ids: list[int], decode: list[Candidate], prefill: list[Candidate], block_size: int, salt: int,
          local_prefill_threshold: int, colocated: bool = False, backlog_s: float | None = None) -> Placement:
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
    if backlog_s is not None and d.inflight_tokens == 0 and p.prefill_rate:
        queued_s = p.inflight_tokens / p.prefill_rate
        local_s = uncached / (d.prefill_rate or p.prefill_rate)
        if queued_s >= backlog_s and local_s < work(p)[0] / p.prefill_rate:
            return Placement(d.worker_id, None, "decode_local_backlog", d_cached)
    return Placement(d.worker_id, p.worker_id, "prefill_remote", overlap_tokens(hashes, p.prefix_hashes, block_size))
