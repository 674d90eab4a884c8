"""The load generator of `splitserve bench serve`: a random synthetic dataset, Poisson arrivals under an optional
concurrency cap, and one streamed OpenAI request per prompt, timed chunk by chunk.

    make_dataset  -> [RequestSpec]    prompt lengths uniform in MEAN*(1 +- FRAC), made of whole-word tokens
    arrival_times -> send offsets     exponential gaps of mean 1/rate (rate inf: every request at t=0)
    run_load      -> [RequestResult]  at its offset, once a concurrency slot is free, each spec is POSTed with
                                      stream=true; the first content chunk gives TTFT, the gaps between later
                                      ones the inter-token latencies, the usage chunk the token counts

Prompts are sampled from the tokenizer's whole-word tokens (" cart", " botanical", ...), so a prompt of N ids
decodes to N words that re-encode to the same N ids: `/v1/completions` gets the ids themselves (exact length on
any server that takes token-id prompts), `/v1/chat/completions` gets the words (length exact up to the chat
template, whose overhead is subtracted). Output length is made exact with `ignore_eos` (splitserve's extension)
and `min_tokens` (vLLM's); a server that refuses unknown fields can be measured with --no-ignore-eos.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}


@dataclass(slots=True)
class WorkloadConfig:
    num_prompts: int = 100
    input_len: int = 512
    input_len_range: float = 0.0      # lengths are uniform in [MEAN*(1-FRAC), MEAN*(1+FRAC)]
    output_len: int = 128
    output_len_range: float = 0.0
    endpoint: str = "completions"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("input_len_range", "output_len_range"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")


@dataclass(slots=True)
class RequestSpec:
    prompt: list[int] | str
    input_len: int                     # tokens the prompt is meant to have (chat: template included)
    output_len: int


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    input_len: int = 0                 # requested
    output_len: int = 0                # requested
    prompt_tokens: int = 0             # as the server counted them (usage), else the requested length
    output_tokens: int = 0             # usage, else the number of content chunks
    ttft: float = 0.0                  # seconds from send to the first content chunk
    itl: list[float] = field(default_factory=list)   # seconds between successive content chunks
    latency: float = 0.0               # seconds from send to the end of the stream
    start: float = 0.0                 # send time, seconds since the run began
    error: str = ""


class WordTokens:
    """A tokenizer's whole-word tokens: ids that decode to a space and a lowercase ASCII word of 3+ letters."""

    def __init__(self, tokenizer_dir: str | Path) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.ids = sorted(i for s, i in self.tok.get_vocab().items()
                          if s[:1] in ("Ġ", "▁") and s[1:].isascii() and s[1:].isalpha() and s[1:].islower()
                          and len(s) >= 4)
        if len(self.ids) < 100:
            raise ValueError(f"the tokenizer in {tokenizer_dir} has only {len(self.ids)} whole-word tokens; "
                             "pass --tokenizer with a BPE tokenizer (GPT-2 or SentencePiece style)")

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def chat_overhead(self) -> int:
        """Tokens the chat template adds around an empty user message (0 for a model without a template)."""
        if not getattr(self.tok, "chat_template", None):
            return 0
        text = self.tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                            tokenize=False)
        return len(self.tok.encode(text, add_special_tokens=False))


def default_tokenizer_dir() -> Path:
    """splitserve's own model directory (converted once into the cache; nothing is downloaded)."""
    from splitserve.engine.loader.resolve import prepare_model
    from splitserve.settings import settings

    return prepare_model(settings.default_model, settings.cache_dir, False)


def _lengths(rng: random.Random, mean: int, frac: float, n: int) -> list[int]:
    low, high = max(1, math.floor(mean * (1 - frac))), max(1, math.ceil(mean * (1 + frac)))
    return [rng.randint(low, high) for _ in range(n)]


def make_dataset(config: WorkloadConfig, words: WordTokens, prompt_seed: int | None = None) -> list[RequestSpec]:
    """`config.seed` draws the lengths (and, unless `prompt_seed` is given, the words too); a sweep passes
    one `prompt_seed` per rate, so every rate gets the same lengths with words of its own."""
    rng = random.Random(config.seed)
    inputs = _lengths(rng, config.input_len, config.input_len_range, config.num_prompts)
    outputs = _lengths(rng, config.output_len, config.output_len_range, config.num_prompts)
    if prompt_seed is not None:
        rng = random.Random(f"{config.seed}/prompts/{prompt_seed}")
    overhead = words.chat_overhead() if config.endpoint == "chat" else 0
    specs = []
    for n_in, n_out in zip(inputs, outputs):
        ids = [rng.choice(words.ids) for _ in range(max(1, n_in - overhead))]
        prompt = ids if config.endpoint == "completions" else words.text(ids)
        specs.append(RequestSpec(prompt=prompt, input_len=len(ids) + overhead, output_len=n_out))
    return specs


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send offsets (seconds) of a Poisson process of `rate` requests/s; rate inf: all at 0."""
    if not rate > 0:
        raise ValueError(f"request_rate must be > 0 (or inf), got {rate!r}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def request_body(spec: RequestSpec, model: str, endpoint: str, ignore_eos: bool) -> dict:
    body: dict = {"model": model, "max_tokens": spec.output_len, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}}
    if endpoint == "completions":
        body["prompt"] = spec.prompt
    else:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    if ignore_eos:
        body.update(ignore_eos=True, min_tokens=spec.output_len)
    return body


def _content(event: dict) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


async def send_one(client: httpx.AsyncClient, url: str, body: dict, spec: RequestSpec, t0: float,
                   headers: dict | None = None) -> RequestResult:
    """One streamed request; every chunk is stamped as it arrives. Errors are recorded, never raised."""
    result = RequestResult(input_len=spec.input_len, output_len=spec.output_len, prompt_tokens=spec.input_len)
    start = time.perf_counter()
    result.start = start - t0
    last, chunks, usage = None, 0, None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    result.error = f"stream error: {json.dumps(event['error'])[:300]}"
                    return result
                usage = event.get("usage") or usage
                if _content(event):
                    chunks += 1
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"[:300] or type(e).__name__
        return result
    if last is None:
        result.error = "the stream ended without any content"
        return result
    result.output_tokens = int(usage["completion_tokens"]) if usage else chunks
    result.prompt_tokens = int(usage["prompt_tokens"]) if usage else spec.input_len
    result.ok = True
    return result


class Progress:
    """`label: done/total (failed), in flight, elapsed` on stderr; rewritten in place on a terminal."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done = self.failed = self.in_flight = 0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._next_line, self._printed = 0, -1

    def update(self, final: bool = False) -> None:
        if not self.enabled:
            return
        line = (f"{self.label}: {self.done}/{self.total} done ({self.failed} failed), {self.in_flight} in flight, "
                f"{time.perf_counter() - self.t0:.0f}s")
        if self.tty:
            print("\r" + line.ljust(80), end="\n" if final else "", file=sys.stderr, flush=True)
        elif self.done >= self._next_line or (final and self.done != self._printed):   # every tenth, and the end
            print(line, file=sys.stderr, flush=True)
            self._printed, self._next_line = self.done, self.done + max(1, self.total // 10)


async def run_load(base_url: str, model: str, specs: list[RequestSpec], *, endpoint: str = "completions",
                   request_rate: float = math.inf, max_concurrency: int | None = None, seed: int = 0,
                   ignore_eos: bool = True, api_key: str | None = None, timeout: float = 600.0,
                   progress: Progress | None = None) -> tuple[list[RequestResult], float]:
    """Send every spec at its Poisson offset; returns the results (in spec order) and the run's wall time."""
    url = base_url.rstrip("/") + ENDPOINTS[endpoint]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    offsets = arrival_times(len(specs), request_rate, seed)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    progress = progress or Progress("load", len(specs), enabled=False)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        t0 = time.perf_counter()

        async def one(spec: RequestSpec) -> RequestResult:
            body = request_body(spec, model, endpoint, ignore_eos)
            if slots:
                async with slots:
                    return await tracked(body, spec)
            return await tracked(body, spec)

        async def tracked(body: dict, spec: RequestSpec) -> RequestResult:
            progress.in_flight += 1
            try:
                result = await send_one(client, url, body, spec, t0, headers)
            finally:
                progress.in_flight -= 1
            progress.done += 1
            progress.failed += not result.ok
            progress.update()
            return result

        ticker = asyncio.create_task(_tick(progress)) if progress.tty and progress.enabled else None
        tasks = []
        for spec, offset in zip(specs, offsets):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(spec)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        if ticker:
            ticker.cancel()
    progress.update(final=True)
    return list(results), duration


async def _tick(progress: Progress) -> None:
    while True:
        await asyncio.sleep(1.0)
        progress.update()
