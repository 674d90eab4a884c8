"""What the sync and asyncio clients share: building requests, channel settings, and the resume bookkeeping.

Both clients run the same loop around a request's stream:

    Generate ──chunks──> (connection drops: UNAVAILABLE, or the stream ends without Complete)
       │                        │
       │  no chunk yet ─────────┴─> Resume(id, 0); NOT_FOUND there means the server never got it -> Generate again
       │  chunks seen  ──────────-> Resume(id, last_seq): continues with no gap and no repeat
       └──> Complete / Error: done

The client picks the request id itself, so it can resume even a request whose first chunk it never saw.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc

from splitserve.proto.v1 import api_pb2 as pb

from .errors import DeadlineExceeded, GenerationFailed, Unavailable, from_rpc_error
from .types import Chunk, Completion, LoadInfo, ModelInfo, Usage, WorkerLoad

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop",
                   "stop_token_ids", "ignore_eos")
CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
ABORT_TIMEOUT_S = 5.0
NO_ABORT_CODES = ("INVALID_ARGUMENT", "UNAUTHENTICATED", "NOT_FOUND", "PERMISSION_DENIED")


def read_pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes, from bytes, a PEM string or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and "-----BEGIN" in value:
        return value.encode()
    return Path(value).read_bytes()


def channel_credentials(tls: bool | None, root_certificates) -> grpc.ChannelCredentials | None:
    roots = read_pem(root_certificates)
    if roots is None and not tls:
        return None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def build_request(prompt: str | Sequence[int] | None, messages: list[dict] | None, request_id: str | None,
                  model: str | None, sampling: dict) -> pb.GenerateRequest:
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(SAMPLING_FIELDS)}")
    req = pb.GenerateRequest(request_id=request_id or f"req-{uuid.uuid4().hex}", model=model or "")
    if (prompt is None) == (messages is None):
        raise TypeError("give exactly one of prompt (text or token ids) and messages")
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
    p = req.params
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "stop":
            p.stop.extend([value] if isinstance(value, str) else value)
        elif name == "stop_token_ids":
            p.stop_token_ids.extend(value)
        else:
            setattr(p, name, value)
    return req


@dataclass(slots=True)
class StreamState:
    """One request's progress across reconnects."""
    request_id: str
    deadline: float | None
    last_seq: int = 0
    resuming: bool = False          # the next call is Resume (not Generate)
    can_submit: bool = True         # whether this stream may (re)send Generate; False for a bare resume()
    failures: int = 0               # consecutive reconnect attempts without progress
    done: bool = False
    completion: Completion | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def accept(self, resp: pb.GenerateResponse) -> list[Chunk]:
        """Chunks to hand out for one response (none for a repeat); raises GenerationFailed on an Error."""
        kind = resp.WhichOneof("event")
        msg = getattr(resp, kind)
        if msg.seq and msg.seq <= self.last_seq:
            return []
        self.last_seq = msg.seq or self.last_seq
        self.failures = 0
        if kind == "error":
            self.done = True
            raise GenerationFailed(msg.message, msg.code.upper() or "INTERNAL", msg.field or None, self.request_id)
        chunks = []
        if msg.token_ids or msg.text:
            chunks.append(Chunk(msg.request_id or self.request_id, msg.seq, list(msg.token_ids), msg.text))
            self.text.append(msg.text)
            self.token_ids += msg.token_ids
        if kind == "complete":
            self.done = True
            u = msg.usage
            self.completion = Completion(self.request_id, "".join(self.text), list(self.token_ids),
                                         msg.finish_reason, Usage(u.prompt_tokens, u.completion_tokens,
                                                                  u.cached_tokens))
        return chunks

    def on_drop(self, e: grpc.RpcError | None, max_retries: int) -> float:
        """After a failed or cut call: the seconds to wait before reconnecting; raises when not to retry."""
        code = e.code() if e is not None else grpc.StatusCode.UNAVAILABLE
        if code == grpc.StatusCode.NOT_FOUND and self.resuming and self.last_seq == 0 and self.can_submit:
            self.resuming = False       # the server never got the request: send it again
            return 0.0
        if code != grpc.StatusCode.UNAVAILABLE:
            raise from_rpc_error(e, self.request_id)
        self.failures += 1
        remaining = self.remaining()
        if remaining == 0.0:
            raise DeadlineExceeded("deadline exceeded while reconnecting", "DEADLINE_EXCEEDED", None,
                                   self.request_id)
        if self.failures > max_retries:
            raise from_rpc_error(e, self.request_id) if e is not None else Unavailable(
                "the stream kept ending before the request finished", "UNAVAILABLE", None, self.request_id)
        self.resuming = True
        delay = min(2.0, 0.1 * 2 ** (self.failures - 1)) * (0.5 + random.random())
        return delay if remaining is None else min(delay, remaining)

    def resume_request(self) -> pb.ResumeRequest:
        return pb.ResumeRequest(request_id=self.request_id, last_seq=self.last_seq)


def to_model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(m.name, m.max_model_len, m.vocab_size, m.dtype, m.block_size, m.fingerprint)


def to_load_info(m: pb.LoadInfo) -> LoadInfo:
    return LoadInfo(m.num_running, m.num_waiting, m.kv_cache_usage, m.num_free_blocks, m.num_total_blocks,
                    [WorkerLoad(w.worker_id, w.role, w.num_running, w.num_waiting, w.kv_cache_usage,
                                w.num_free_blocks, w.num_total_blocks, w.state, w.num_migrating_out)
                     for w in m.workers])


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout
