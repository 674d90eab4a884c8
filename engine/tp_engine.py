"""TPEngine: one engine over `--tp N` ranks, one process per rank. Rank 0 schedules, samples and drives.

    rank 0 (the calling process)                       rank r > 0 (`python -m splitserve.engine.tp_engine SPEC`)
    LLMEngine.step(): scheduler.schedule() -> batch     FollowerRank.serve():
    DriverRunner.execute(batch):                          read a StepHeader from stdin      (EOF or QUIT: exit)
      StepHeader (16 bytes) -> every follower's stdin
      broadcast the step's int64 payload  ------------>   broadcast: token ids, positions, lens, block tables
      forward (all-reduces with every rank)  <-------->   the same forward on its own shard
      gather the logits rows, sample (rank 0 only) <---   its slice of the logits rows

The header travels on a pipe, not on the group, because every collective is bounded by the group's timeout: a
follower waiting for the next step in a broadcast would time out whenever the engine sits idle. A pipe wait is
unbounded, and ends (EOF) when rank 0 dies. Everything that can fail inside a step (a follower died or hangs)
surfaces at rank 0 as a TPRankError within the group's timeout.

In a cluster a Ray actor per rank wraps `FollowerRank` (cluster/tp_ranks.py), rank 0 is the worker actor's
`driver_engine`, and it reaches the followers through `RayFollowers` (a Ray actor call delivers each `StepHeader`)
instead of `FollowerProcesses`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import torch

from . import dist as tp_dist
from .attention.metadata import AttentionMetadata
from .config import EngineConfig
from .layer_parallel import compose, layer_parallel_transform
from .llm_engine import LLMEngine
from .loader.resolve import prepare_model
from .model_config import ModelConfig
from .model_runner import ModelRunner
from .models.llama import ForwardContext
from .scheduler import ScheduledBatch
from .tp import kv_heads_of_rank, tp_transform

QUIT, STEP, LOGITS = 0, 1, 2   # LOGITS: every token's logits (teacher-forced evaluation), not just the sampled rows


class TPRankError(RuntimeError):
    """A tensor-parallel rank died or stopped answering: this engine cannot continue."""


# ---- one step, as int tensors --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StepHeader:
    kind: int
    num_seqs: int
    num_tokens: int
    width: int                                  # block-table columns
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<4i")

    @property
    def payload_numel(self) -> int:
        return 2 * self.num_tokens + (3 + self.width) * self.num_seqs

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.kind, self.num_seqs, self.num_tokens, self.width)

    @classmethod
    def unpack(cls, data: bytes) -> "StepHeader":
        return cls(*cls.FORMAT.unpack(data))


def pack_step(batch: ScheduledBatch, kind: int) -> tuple[StepHeader, torch.Tensor]:
    """Payload: token ids [T], positions [T], query lens [B], context lens [B], sample flags [B], block tables
    [B, W] (zero-padded), as one int64 tensor. Positions and ids are those ModelRunner.prepare feeds the model."""
    ids: list[int] = []
    positions: list[int] = []
    context_lens, flags = [], []
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start = seq.num_computed_tokens
        ids += seq.token_ids[start:start + n]
        positions += range(start, start + n)
        context_lens.append(start + n)
        flags.append(int(batch.samples(i)))
    width = max((len(s.block_table) for s in batch.seqs), default=1) or 1
    tables = [b for s in batch.seqs for b in s.block_table + [0] * (width - len(s.block_table))]
    header = StepHeader(kind, len(batch), len(ids), width)
    return header, torch.tensor(ids + positions + list(batch.num_new_tokens) + context_lens + flags + tables)


class FollowerRank:
    """Rank r > 0: runs rank 0's steps on its shard of the model. Plain class: a process or a Ray actor wraps it."""

    def __init__(self, runner: ModelRunner, group) -> None:
        self.runner, self.group = runner, group

    def report_ready(self) -> None:
        """Meet rank 0 once loaded (see `meet_ranks`)."""
        meet_ranks(self.runner, self.group)

    @torch.inference_mode()
    def run(self, header: StepHeader, on_layer_done: Callable[[int], None] | None = None) -> None:
        r = self.runner
        payload = tp_dist.broadcast(torch.empty(header.payload_numel, dtype=torch.long, device=r.device), self.group)
        b, t = header.num_seqs, header.num_tokens
        ids, positions = payload[:t], payload[t:2 * t]
        query_lens, context_lens, flags, tables = payload[2 * t:].cpu().split([b, b, b, b * header.width])
        meta = AttentionMetadata.build(query_lens.tolist(), context_lens.tolist(),
                                       tables.view(b, header.width).tolist(), r.config.block_size, r.device)
        hidden = r.model(ids, positions, ForwardContext(r.kv_cache, meta, r.backend, on_layer_done))
        rows = flags.nonzero().flatten()
        if header.kind == LOGITS:                 # mirror exactly what rank 0 gathers
            r.model.compute_logits(hidden)
        elif len(rows):
            r.model.compute_logits(hidden[meta.cu_seqlens_q[1:].long()[rows] - 1])

    def serve(self, pipe) -> None:
        """Run steps until rank 0 says QUIT or its end of the pipe closes."""
        while True:
            data = pipe.read(StepHeader.FORMAT.size)
            if len(data) < StepHeader.FORMAT.size:
                return
            header = StepHeader.unpack(data)
            if header.kind == QUIT:
                return
            self.run(header)


def meet_ranks(runner: ModelRunner, group) -> None:
    """Every rank calls this once its model is loaded: rank 0 learns that all are ready, and that all have the
    same number of KV blocks (rank 0's block tables index every rank's cache)."""
    blocks = tp_dist.gather(torch.tensor([runner.layout.num_blocks], device=runner.device), group)
    if blocks is not None and len({int(b) for b in blocks}) != 1:
        raise TPRankError(f"ranks disagree on the number of KV blocks: {[int(b) for b in blocks]}")


# ---- rank 0 ------------------------------------------------------------------------------------------------------
class Followers(Protocol):
    """How rank 0 reaches ranks 1..N-1 outside the group: subprocess pipes here, Ray actor calls in a cluster."""

    def send(self, header: StepHeader) -> None: ...            # wake every follower for one step

    def check(self) -> None: ...                               # raise TPRankError if a follower is known dead

    def failure(self, error: BaseException, timeout_s: float) -> TPRankError: ...   # explain a failed collective


class FollowerProcesses:
    """The spawned ranks 1..N-1 and the pipes that wake them."""

    def __init__(self, specs: list[dict]) -> None:
        self.procs: list[subprocess.Popen] = []
        for spec in specs:
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(spec["threads"])} if spec["threads"] else {}))
            self.procs.append(subprocess.Popen([sys.executable, "-m", "splitserve.engine.tp_engine", json.dumps(spec)],
                                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env))

    def send(self, header: StepHeader) -> None:
        data = header.pack()
        for p in self.procs:
            p.stdin.write(data)
            p.stdin.flush()

    def check(self, wait_s: float = 0.0) -> None:
        """Raise TPRankError if a follower has exited (waiting up to wait_s for a dying one to be reaped)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [(r, p.poll()) for r, p in enumerate(self.procs, start=1) if p.poll() is not None]
            if dead:
                raise TPRankError("tensor-parallel " + ", ".join(f"rank {r} exited with code {rc}" for r, rc in dead)
                                  + "; this engine cannot continue")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def failure(self, error: BaseException, timeout_s: float) -> TPRankError:
        try:
            self.check(wait_s=2.0)
        except TPRankError as dead:
            return dead
        return TPRankError(f"tensor-parallel step failed with every rank alive ({error}); a rank that hangs fails "
                           f"the collective after {timeout_s:g}s; this engine cannot continue")

    def stop(self, timeout_s: float = 5.0) -> None:
        for p in self.procs:
            try:
                if p.poll() is None:
                    p.stdin.write(StepHeader(QUIT, 0, 0, 0).pack())
                p.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class DriverRunner:
    """Rank 0's runner: announces each step to the followers, then runs it as the plain ModelRunner does."""

    def __init__(self, runner: ModelRunner, group, followers: Followers, timeout_s: float) -> None:
        self.runner, self.group, self.followers, self.timeout_s = runner, group, followers, timeout_s
        self.failed: TPRankError | None = None

    def __getattr__(self, name: str):          # dtype, layout, kv_cache, fingerprint, model, ...
        return getattr(self.runner, name)

    def execute(self, batch: ScheduledBatch, seeds: list[int],
                on_layer_done: Callable[[int], None] | None = None) -> list[int | None]:
        return self._drive(batch, STEP, lambda: self.runner.execute(batch, seeds, on_layer_done))

    def logits(self, batch: ScheduledBatch) -> torch.Tensor:
        return self._drive(batch, LOGITS, lambda: self.runner.logits(batch))

    def _drive(self, batch: ScheduledBatch, kind: int, forward: Callable):
        if self.failed is not None:
            raise self.failed
        try:
            self.followers.check()
            header, payload = pack_step(batch, kind)
            self.followers.send(header)
            tp_dist.broadcast(payload.to(self.runner.device), self.group)
            return forward()
        except TPRankError as e:
            self.failed = e
        except (RuntimeError, OSError) as e:      # Gloo/NCCL errors and broken pipes
            self.failed = self.followers.failure(e, self.timeout_s)
        raise self.failed


class TPEngine(LLMEngine):
    """LLMEngine whose model is sharded over `config.tp` ranks (Gloo on CPU, NCCL on CUDA); `close()` stops them."""

    def __init__(self, config: EngineConfig, timeout_s: float = tp_dist.DEFAULT_TIMEOUT_S,
                 threads_per_rank: int | None = None) -> None:
        if config.tp < 2:
            raise ValueError(f"TPEngine needs tp >= 2, got tp={config.tp}; use LLMEngine")
        model_dir = prepare_model(config.model, config.cache_dir, verbose=config.verbose)
        config = uniform_kv_blocks(config, model_dir)
        on_cpu = torch.device(config.device).type == "cpu"
        threads = threads_per_rank or (max(1, (os.cpu_count() or 1) // config.tp) if on_cpu else None)
        store = tp_dist.host_store(timeout_s=timeout_s)
        prefix = f"tp/{uuid.uuid4().hex[:12]}"
        rank_config = dataclasses.asdict(dataclasses.replace(config, verbose=False))
        rank_config.update(cache_dir=str(config.cache_dir), model=str(model_dir))
        specs = [dict(rank=r, world_size=config.tp, addr=f"127.0.0.1:{store.port}", prefix=prefix,
                      timeout_s=timeout_s, threads=threads, model_dir=str(model_dir),
                      config=dict(rank_config, device=_rank_device(config.device, r))) for r in range(1, config.tp)]
        self.followers = FollowerProcesses(specs)       # started first: every rank loads its weights at once
        self._finalizer = weakref.finalize(self, self.followers.stop)
        self._threads_before = torch.get_num_threads()
        try:
            if threads:                                 # this process is rank 0: its share of the cores
                torch.set_num_threads(threads)
            group = tp_dist.new_group(store, 0, config.tp, config.device, timeout_s, prefix)
            super().__init__(config, model_transform=rank_transform(group, config))
            meet_ranks(self.runner, group)
        except Exception as e:
            collective = isinstance(e, RuntimeError) and not isinstance(e, TPRankError)     # Gloo/NCCL errors
            error = self.followers.failure(e, timeout_s) if collective else e
            self.close()
            raise error from (e if error is not e else None)
        self.group, self._store = group, store
        self.runner = DriverRunner(self.runner, group, self.followers, timeout_s)

    def close(self) -> None:
        """Stop the follower ranks (also done when the engine is garbage-collected or the interpreter exits) and
        give this process its torch thread count back."""
        self._finalizer()
        torch.set_num_threads(self._threads_before)

    def __enter__(self) -> "TPEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def driver_engine(config: EngineConfig, group, followers: Followers, timeout_s: float = tp_dist.DEFAULT_TIMEOUT_S,
                  **engine_kwargs) -> LLMEngine:
    """Rank 0 of a worker whose ranks 1..N-1 were started elsewhere (Ray actors in a cluster) and joined `group`:
    an LLMEngine on rank 0's shard whose runner drives the followers. `config.num_kv_blocks` must already be
    uniform (see `uniform_kv_blocks`); every follower builds its runner with `follower_runner`."""
    engine = LLMEngine(config, model_transform=rank_transform(group, config), **engine_kwargs)
    meet_ranks(engine.runner, group)
    engine.runner = DriverRunner(engine.runner, group, followers, timeout_s)
    return engine


def follower_runner(config: EngineConfig, model_dir: Path, group) -> FollowerRank:
    """Rank r > 0's shard of the model, ready to run rank 0's steps (call `report_ready` once rank 0 loads)."""
    return FollowerRank(ModelRunner(config, model_dir, model_transform=rank_transform(group, config)), group)


def rank_transform(group, config: EngineConfig):
    """What every rank applies to its freshly loaded model: its tensor-parallel shard, then layer pairs."""
    return compose(tp_transform(group), layer_parallel_transform(config.layer_parallel))


def _rank_device(device: str, rank: int) -> str:
    if not device.startswith("cuda"):
        return device
    base = int(device.partition(":")[2] or 0)
    return f"cuda:{base + rank}"


def uniform_kv_blocks(config: EngineConfig, model_dir: Path) -> EngineConfig:
    """Pin num_kv_blocks so every rank has the same blocks (rank 0's block tables index every rank's cache):
    what kv_cache_memory_gb holds on the rank with the most KV heads."""
    if config.num_kv_blocks:
        return config
    mc = ModelConfig.from_dir(model_dir)
    heads = max(len(kv_heads_of_rank(mc.num_key_value_heads, config.tp, r)) for r in range(config.tp))
    per_block = 2 * mc.num_hidden_layers * config.block_size * heads * mc.head_dim * config.torch_dtype.itemsize
    return dataclasses.replace(config, num_kv_blocks=max(1, int(config.kv_cache_memory_gb * 2**30 // per_block)))


def follower_main(spec: dict) -> int:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    fields = dict(spec["config"])
    if fields.get("layer_parallel") is not None:
        fields["layer_parallel"] = tuple(fields["layer_parallel"])
    config = EngineConfig(**fields)
    group = tp_dist.join_group(spec["addr"], spec["rank"], spec["world_size"], config.device, spec["timeout_s"],
                               spec["prefix"])
    try:
        follower = follower_runner(config, Path(spec["model_dir"]), group)
        follower.report_ready()
        follower.serve(sys.stdin.buffer)
    except RuntimeError as e:                  # rank 0 went away mid-step: nothing left to serve
        print(f"tensor-parallel rank {spec['rank']}: {e}", file=sys.stderr)
        return 1
    finally:
        tp_dist.drop_group(group)
    return 0


if __name__ == "__main__":
    sys.exit(follower_main(json.loads(sys.argv[1])))
