"""The step scheduler: continuous batching with chunked prefill, plain Python.

    add() ──> waiting ──schedule()──> running ──postprocess()──> finished
                 ^                       │
                 └──── preempt (blocks ran out: free them, recompute later) ┘

Each step has a token budget. Running sequences go first (decodes take 1 token, unfinished prefills take the next
chunk), so decoding never stalls behind a long prompt; then waiting sequences are admitted, their prompts cut into
chunks that fit what is left of the budget. `max_prefill_tokens_with_decodes` caps the prompt tokens of a step
that also decodes (a decode or colocated worker): every decoding stream waits for the step, so a long chunk is an
inter-token stall for all of them; urgent sequences (recoveries) are exempt. When a running sequence needs a
block and none is free, the most
recently admitted sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed (its prefix cache entries usually make that cheap).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 1024
    max_model_len: int = 8192
    eos_token_ids: tuple[int, ...] = ()
    reserve_full_prompt: bool = False   # prefill workers: a sequence's blocks exist from admission (KV streaming)
    max_prefill_tokens_with_decodes: int = 0   # prompt tokens of a step that also decodes; 0 = no cap

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_prefill_tokens_with_decodes < 0:
            raise ValueError("max_prefill_tokens_with_decodes must be >= 0 (0 = no cap), got "
                             f"{self.max_prefill_tokens_with_decodes}")


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)

    def samples(self, i: int) -> bool:
        """Whether sequence i's chunk reaches the end of its tokens, so the step samples a token for it."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue ----------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.num_tokens, seq.params.max_tokens - seq.num_output_tokens)
        self.waiting.append(seq)

    def check_fits(self, num_tokens: int, max_new_tokens: int) -> None:
        limit = self.config.max_model_len
        if num_tokens >= limit:
            raise ValueError(f"prompt has {num_tokens} tokens; the context is {limit} tokens (prompt must be shorter)")
        if num_tokens + max_new_tokens > limit:
            raise ValueError(f"max_tokens={max_new_tokens} with a {num_tokens}-token prompt exceeds the "
                             f"{limit}-token context; lower max_tokens to at most {limit - num_tokens}")
        if self.blocks.blocks_needed(num_tokens + max_new_tokens) > self.blocks.num_blocks:
            raise ValueError(f"prompt + max_tokens needs more KV blocks than this worker has "
                             f"({self.blocks.num_blocks} blocks of {self.blocks.block_size} tokens)")

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.running) + list(self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    # ---- one step -------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = False
        self._admit_urgent()
        prompt_budget = self._prompt_budget()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if seq.num_uncomputed_tokens > 1 and not seq.urgent:        # a prompt chunk, not a decode
                n = min(n, prompt_budget)
                if n == 0:
                    i += 1
                    continue
                prompt_budget -= n
            while not self.blocks.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            capped = not seq.urgent
            if capped and prompt_budget == 0:
                break
            n = self._take_waiting(min(budget, prompt_budget) if capped else budget)
            if n is None:
                break
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            prompt_budget -= n if capped else 0
        return batch

    def _prompt_budget(self) -> int:
        """Prompt tokens this step may compute for non-urgent sequences: the cap when some running sequence
        decodes, else unlimited (the step budget still applies)."""
        cap = self.config.max_prefill_tokens_with_decodes
        if cap and any(seq.num_uncomputed_tokens == 1 and seq.num_output_tokens for seq in self.running):
            return cap
        return self.config.max_num_batched_tokens

    def add_urgent(self, seq: Sequence) -> None:
        """Queue `seq` ahead of everything waiting except earlier urgent ones; schedule() then admits it ahead of
        the sequences already running, so it takes the token budget first (a recovery whose client stream is
        stalled must not wait for a long prompt's remaining chunks)."""
        seq.urgent = True
        at = 0
        while at < len(self.waiting) and self.waiting[at].urgent:
            at += 1
        self.waiting.insert(at, seq)

    def _take_waiting(self, budget: int) -> int | None:
        """Move the head of `waiting` out of the queue as RUNNING (the caller places it in `running`), with its
        prefix-cache hits and blocks for its next chunk of at most `budget` tokens (its whole prompt with
        reserve_full_prompt). Returns that chunk's size; None, and nothing changed, when the blocks are not there."""
        seq = self.waiting[0]
        if not seq.block_table:
            self.blocks.match_prefix(seq)
        chunk = min(seq.num_uncomputed_tokens, budget)      # after the prefix hits
        if not self.blocks.allocate(seq, seq.num_uncomputed_tokens if self.config.reserve_full_prompt else chunk):
            self.blocks.free(seq)
            return None
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        return chunk

    def _admit_urgent(self) -> None:
        front: list[Sequence] = []
        while self.waiting and self.waiting[0].urgent and len(self.running) + len(front) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._take_waiting(budget=0) is None:   # its chunk is allocated when schedule() gives it budget
                break
            front.append(seq)
        self.running[:0] = front     # preemption takes from the back: urgent sequences are preempted last

    def admit_running(self, seq: Sequence) -> None:
        """A sequence whose KV arrived from elsewhere joins the running batch directly."""
        self.check_fits(seq.num_tokens, seq.params.max_tokens - seq.num_output_tokens)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Advance each sequence by its chunk, append sampled tokens, finish what hit a stop. Returns finished."""
        finished = []
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled):
            if seq.is_finished:           # aborted while the step ran
                continue
            seq.num_computed_tokens += n
            self.blocks.commit(seq)
            if token is None:
                continue
            seq.token_ids.append(token)
            reason = self.stop_reason(seq, token)
            if reason:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (not p.ignore_eos and token in self.config.eos_token_ids) or token in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None
