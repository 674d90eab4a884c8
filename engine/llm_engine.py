"""The engine: tokenizer + scheduler + model runner, stepped by a caller (the CLI, a worker's loop, a test).

    engine.add_request(...)  ->  engine.step() -> [RequestOutput, ...]  (repeat while engine.has_unfinished)
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

from .block_manager import BlockManager
from .config import EngineConfig
from .layer_parallel import compose, layer_parallel_transform
from .loader.resolve import prepare_model
from .model_runner import ModelRunner
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from .sequence import Sequence
from .tokenizer import Detokenizer, Tokenizer


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text: str                         # the text delta of this step
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass(slots=True)
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    seed: int | None = None
    metrics: dict = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig, model_transform=None, reserve_full_prompt: bool = False) -> None:
        self.config = config
        started = time.perf_counter()
        model_dir = prepare_model(config.model, config.cache_dir, verbose=config.verbose)
        self.model_dir = model_dir
        self.tokenizer = Tokenizer(model_dir)
        # tensor parallelism first, then layer pairs (pairing twice is a no-op, so TPEngine may pass both)
        transform = compose(model_transform, layer_parallel_transform(config.layer_parallel))
        self.runner = ModelRunner(config, model_dir, model_transform=transform)
        self.model_config = self.runner.model_config
        salt = int(self.runner.fingerprint, 16) & (2**63 - 1)
        self.block_manager = BlockManager(self.runner.layout.num_blocks, config.block_size, salt=salt)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=self.runner.max_model_len, eos_token_ids=tuple(sorted(eos)),
                            reserve_full_prompt=reserve_full_prompt,
                            max_prefill_tokens_with_decodes=config.max_prefill_tokens_with_decodes),
            self.block_manager)
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, Detokenizer] = {}
        self._seeds: dict[str, int] = {}
        self.load_seconds = time.perf_counter() - started

    # ---- requests -------------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    committed_token_ids: list[int] = ()) -> Sequence:
        """Queue a request. `committed_token_ids` resumes one that already produced those tokens elsewhere."""
        if not prompt_token_ids:
            raise ValueError("prompt is empty: send at least one token")
        if request_id in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already running")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        seq = Sequence(request_id, list(prompt_token_ids) + list(committed_token_ids), params,
                       num_prompt_tokens=len(prompt_token_ids))
        self.scheduler.add(seq)
        self._seqs[request_id] = seq
        self._seeds[request_id] = params.seed if params.seed is not None else random.getrandbits(63)
        detok = Detokenizer(self.tokenizer, params.stop)
        detok.push(list(committed_token_ids))
        detok.emitted = len(detok.text)
        self._detok[request_id] = detok
        return seq

    def add_prefilled(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, params: SamplingParams,
                      seed: int, seq: Sequence, next_token: int) -> None:
        """Admit a request whose KV for `token_ids` already sits in `seq.block_table` (transferred or migrated);
        `next_token` was sampled by the worker that computed it. Decoding continues from here."""
        seq.token_ids = list(token_ids) + [next_token]
        seq.num_prompt_tokens = num_prompt_tokens
        seq.params = params
        seq.num_computed_tokens = len(token_ids)
        self.block_manager.commit(seq)
        self.scheduler.admit_running(seq)
        self._seqs[request_id] = seq
        self._seeds[request_id] = seed
        detok = Detokenizer(self.tokenizer, params.stop)
        detok.push(seq.token_ids[num_prompt_tokens:])
        detok.emitted = len(detok.text)
        self._detok[request_id] = detok

    def detach(self, request_id: str) -> Sequence | None:
        """Take a running request out of this engine without freeing its blocks (live migration hands its KV to
        another worker, then frees them). None if it is not running here."""
        seq = self._seqs.get(request_id)
        if seq is None or seq not in self.scheduler.running:
            return None
        if seq.num_computed_tokens != seq.num_tokens - 1:
            raise ValueError(f"{request_id} is still prefilling; it can only be moved by recompute")
        self.scheduler.running.remove(seq)
        self._forget(request_id)
        return seq

    def seed_of(self, request_id: str) -> int:
        return self._seeds[request_id]

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._forget(request_id)
        return seq is not None

    def _forget(self, request_id: str) -> None:
        self._seqs.pop(request_id, None)
        self._detok.pop(request_id, None)
        self._seeds.pop(request_id, None)

    # ---- stepping -------------------------------------------------------------------------------------
    def step(self, on_layer_done: Callable[[int], None] | None = None,
             before_execute: Callable[[ScheduledBatch], None] | None = None,
             around_execute: Callable[[], ContextManager] | None = None) -> list[RequestOutput]:
        """One scheduled batch through the model. `around_execute()` is entered around the forward pass alone
        (after scheduling, before postprocessing): a worker releases its state lock there."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        if before_execute is not None:
            before_execute(batch)
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        seeds = [self._seeds[s.request_id] for s in batch.seqs]
        with around_execute() if around_execute is not None else contextlib.nullcontext():
            sampled = self.runner.execute(batch, seeds, on_layer_done)
        self.scheduler.postprocess(batch, sampled)
        outputs = []
        for seq, token in zip(batch.seqs, sampled):
            if token is None:
                continue
            detok = self._detok[seq.request_id]
            text = detok.push([token])
            if detok.stopped and not seq.is_finished:
                self.scheduler.finish(seq, "stop")
            if seq.is_finished:
                text += detok.flush()
            outputs.append(RequestOutput(seq.request_id, [token], text, seq.is_finished, seq.finish_reason,
                                         seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens))
            if seq.is_finished:
                self._forget(seq.request_id)
        return outputs

    # ---- convenience ----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        if not prompt:
            raise ValueError("prompt is empty: send a non-empty string")
        if chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run `prompts` to completion together (continuous batching) and return them in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{i}-{random.getrandbits(32):08x}" for i in range(len(prompts))]
        results = {rid: Completion(rid, list(p), [], "", None) for rid, p in zip(ids, prompts)}
        try:
            for rid, prompt, p in zip(ids, prompts, params_list):
                seq = self.add_request(rid, prompt, p)
                results[rid].seed = self._seeds[rid]
            while self.has_unfinished:
                for out in self.step():
                    c = results[out.request_id]
                    c.token_ids += out.new_token_ids
                    c.text += out.text
                    if out.finished:
                        c.finish_reason, c.num_cached_tokens = out.finish_reason, out.num_cached_tokens
        finally:
            for rid in ids:
                if rid in self._seqs:
                    self.abort(rid)
        return [results[rid] for rid in ids]
