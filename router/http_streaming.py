"""Turning a request's `TokenEvent` stream into OpenAI responses: one JSON body, or server-sent events.

A client that disconnects gets its request aborted (its KV blocks freed): for a streamed response when the next
send fails and the event generator is closed, for a plain one by watching the ASGI receive channel.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Literal

from starlette.requests import Request

from .openai_protocol import usage
from .service import GenerationService, ServiceError, TokenEvent

_background: set[asyncio.Task] = set()   # fire-and-forget aborts, referenced until done


@dataclass(slots=True)
class Collected:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, ev: TokenEvent) -> None:
        self.text += ev.text
        self.token_ids += ev.token_ids
        self.num_prompt_tokens = ev.num_prompt_tokens or self.num_prompt_tokens
        self.num_output_tokens = ev.num_output_tokens or self.num_output_tokens
        self.num_cached_tokens = ev.num_cached_tokens or self.num_cached_tokens
        if ev.finished:
            self.finish_reason, self.error = ev.finish_reason, ev.error


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


def abort_later(service: GenerationService, request_id: str) -> None:
    """Abort from a context that may be cancelled (a closing generator): run it as its own task."""
    task = asyncio.get_running_loop().create_task(service.abort(request_id))
    _background.add(task)
    task.add_done_callback(_background.discard)


async def collect(service: GenerationService, request_id: str, request: Request) -> Collected:
    """Every event of the request; aborts it and raises ClientGone if the client disconnects first."""
    async def consume() -> Collected:
        out = Collected()
        async for ev in service.stream(request_id):
            out.add(ev)
        return out

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            abort_later(service, request_id)
    if consumer not in done:
        raise ClientGone(request_id)
    return consumer.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def sse_events(service: GenerationService, request_id: str, model: str, kind: Literal["completion", "chat"],
                     include_usage: bool) -> AsyncIterator[bytes]:
    """`text_completion` or `chat.completion.chunk` events, a usage chunk when asked, then `[DONE]`."""
    created = int(time.time())
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict]) -> bytes:
        return _sse({"id": request_id, "object": obj, "created": created, "model": model, "choices": choices,
                     **extra})

    def choice(text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    finished = False
    last = Collected()
    try:
        if kind == "chat":
            yield chunk([choice(None, None, role=True)])
        try:
            async for ev in service.stream(request_id):
                last.add(ev)
                if ev.finished:
                    finished = True
                    if ev.finish_reason == "error":
                        yield _sse({"error": {"message": ev.error or "generation failed", "type": "internal_error",
                                              "param": None, "code": 500}})
                        break
                    if kind == "chat" and ev.text:
                        yield chunk([choice(ev.text, None)])
                        yield chunk([choice(None, ev.finish_reason)])
                    else:
                        yield chunk([choice(ev.text, ev.finish_reason)])
                elif ev.text:
                    yield chunk([choice(ev.text, None)])
        except ServiceError as e:
            finished = True
            yield _sse({"error": {"message": e.message, "type": "internal_error", "param": e.field, "code": 500}})
        if include_usage and last.finish_reason not in (None, "error"):
            yield _sse({"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": usage(last.num_prompt_tokens, last.num_output_tokens,
                                       last.num_cached_tokens).model_dump()})
        yield _sse("[DONE]")
    finally:
        if not finished:        # the client went away mid-stream (the generator was closed or cancelled)
            abort_later(service, request_id)
