"""Tensor-parallel resharding: which sender rank sends which KV heads to which receiver rank.

Both sides compute the same plan from (total_kv_heads, sender tp, receiver tp), so no extra message is needed.
Each receiver rank pulls each global head it holds (per `kv_head_range`) from one sender rank that holds it;
when several sender ranks hold a head (replication), receiver rank r picks holder r % len(holders), which
spreads the load. Consecutive heads from the same sender rank form one `HeadPull` (one page stream).

    prefill TP=2 (4 heads: 0-1 | 2-3)  ->  decode TP=1 (0-3):   pulls (s0->d0 heads 0-1), (s1->d0 heads 2-3)
    prefill TP=1 (0-3)                 ->  decode TP=2:         pulls (s0->d0 heads 0-1), (s0->d1 heads 2-3)
    prefill TP=2 (1 head, replicated)  ->  decode TP=1:         pull  (s0->d0 head 0); s1 sends nothing
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.kv_layout import kv_head_range


@dataclass(frozen=True, slots=True)
class HeadPull:
    src_rank: int
    dst_rank: int
    head_start: int   # global KV heads [head_start, head_end)
    head_end: int

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start

    def src_slice(self, total_kv_heads: int, src_tp: int) -> slice:
        """The heads of this pull in the sender rank's local head dimension."""
        base = kv_head_range(total_kv_heads, src_tp, self.src_rank).start
        return slice(self.head_start - base, self.head_end - base)

    def dst_slice(self, total_kv_heads: int, dst_tp: int) -> slice:
        base = kv_head_range(total_kv_heads, dst_tp, self.dst_rank).start
        return slice(self.head_start - base, self.head_end - base)


def plan_pulls(total_kv_heads: int, src_tp: int, dst_tp: int) -> list[HeadPull]:
    """Every (sender rank -> receiver rank, head range) stream of one transfer; raises ValueError on a TP degree
    that `kv_head_range` rejects."""
    src_ranges = [kv_head_range(total_kv_heads, src_tp, s) for s in range(src_tp)]
    pulls: list[HeadPull] = []
    for r in range(dst_tp):
        run: list[int] = []   # [src, start, end] of the pull being built
        for h in kv_head_range(total_kv_heads, dst_tp, r):
            holders = [s for s, rng in enumerate(src_ranges) if h in rng]
            src = holders[r % len(holders)]
            if run and run[0] == src and run[2] == h:
                run[2] = h + 1
            else:
                if run:
                    pulls.append(HeadPull(run[0], r, run[1], run[2]))
                run = [src, h, h + 1]
        pulls.append(HeadPull(run[0], r, run[1], run[2]))
    return pulls


def pulls_from(total_kv_heads: int, src_tp: int, dst_tp: int, src_rank: int) -> list[HeadPull]:
    return [p for p in plan_pulls(total_kv_heads, src_tp, dst_tp) if p.src_rank == src_rank]


def pulls_to(total_kv_heads: int, src_tp: int, dst_tp: int, dst_rank: int) -> list[HeadPull]:
    return [p for p in plan_pulls(total_kv_heads, src_tp, dst_tp) if p.dst_rank == dst_rank]
