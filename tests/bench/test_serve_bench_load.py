"""`splitserve bench serve` load generator: Poisson arrivals, the synthetic dataset, timing a streamed reply."""

from __future__ import annotations

import asyncio
import json
import math
import statistics

import httpx
import pytest

from splitserve.bench.serve_load import (RequestSpec, WordTokens, WorkloadConfig, arrival_times, default_tokenizer_dir,
                                         make_dataset, request_body, send_one)


def test_poisson_arrivals_have_the_requested_mean_rate():
    for rate in (0.2, 1.0, 8.0):
        times = arrival_times(20_000, rate, seed=3)
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert times[0] == 0.0 and all(g >= 0 for g in gaps)
        assert 1 / statistics.fmean(gaps) == pytest.approx(rate, rel=0.03)
        assert statistics.stdev(gaps) == pytest.approx(1 / rate, rel=0.05)     # exponential: stdev = mean


def test_arrivals_are_seeded_and_inf_sends_everything_at_once():
    assert arrival_times(50, 2.0, seed=1) == arrival_times(50, 2.0, seed=1)
    assert arrival_times(50, 2.0, seed=1) != arrival_times(50, 2.0, seed=2)
    assert arrival_times(5, math.inf, seed=1) == [0.0] * 5
    with pytest.raises(ValueError, match="request_rate"):
        arrival_times(5, 0.0, seed=1)


def test_a_sweep_scales_one_arrival_pattern():
    """Every rate of a sweep replays the same seeded gaps on its own time scale (common random numbers)."""
    slow, fast = arrival_times(40, 1.0, seed=4), arrival_times(40, 2.5, seed=4)
    assert fast == pytest.approx([t / 2.5 for t in slow])


def test_sweep_rates_get_the_same_lengths_and_their_own_words(words):
    config = WorkloadConfig(num_prompts=12, input_len=40, input_len_range=0.5, output_len=8, output_len_range=0.5,
                            seed=9)
    a, b = make_dataset(config, words, prompt_seed=0), make_dataset(config, words, prompt_seed=1)
    assert [(s.input_len, s.output_len) for s in a] == [(s.input_len, s.output_len) for s in b]
    assert len({(s.input_len, s.output_len) for s in a}) > 1          # the lengths do vary
    assert all(x.prompt != y.prompt for x, y in zip(a, b))
    assert [s.prompt for s in make_dataset(config, words, prompt_seed=1)] == [s.prompt for s in b]


@pytest.mark.parametrize("field,value", [("num_prompts", 0), ("input_len", -1), ("input_len_range", 1.0),
                                         ("output_len_range", -0.1), ("endpoint", "embeddings")])
def test_bad_workload_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        WorkloadConfig(**{field: value})


@pytest.fixture(scope="module")
def words():
    return WordTokens(default_tokenizer_dir())


def test_dataset_lengths_are_in_range_and_prompts_round_trip(words):
    config = WorkloadConfig(num_prompts=200, input_len=100, input_len_range=0.25, output_len=32,
                            output_len_range=0.5, seed=7)
    specs = make_dataset(config, words)
    assert all(75 <= s.input_len <= 125 and len(s.prompt) == s.input_len for s in specs)
    assert all(16 <= s.output_len <= 48 for s in specs)
    assert statistics.fmean(s.input_len for s in specs) == pytest.approx(100, rel=0.05)
    # whole-word tokens: the text of a prompt re-encodes to exactly its ids
    assert words.tok.encode(words.text(specs[0].prompt), add_special_tokens=False) == specs[0].prompt
    assert make_dataset(config, words)[5].prompt == specs[5].prompt          # seeded


def test_chat_prompts_count_the_template(words):
    specs = make_dataset(WorkloadConfig(num_prompts=3, input_len=64, endpoint="chat"), words)
    text = words.tok.apply_chat_template([{"role": "user", "content": specs[0].prompt}], add_generation_prompt=True,
                                         tokenize=False)
    assert len(words.tok.encode(text, add_special_tokens=False)) == specs[0].input_len == 64


def _sse(events: list) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def test_send_one_times_content_chunks_and_reads_usage():
    chunks = [{"choices": [{"text": t}]} for t in ("a", "", "b", "c")]
    body = _sse(chunks + [{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}, "[DONE]"])
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            spec = RequestSpec(prompt=[1, 2, 3], input_len=3, output_len=4)
            return await send_one(client, "http://x/v1/completions", request_body(spec, "m", "completions", True),
                                  spec, t0=0.0)

    r = asyncio.run(go())
    assert r.ok and r.output_tokens == 4 and r.prompt_tokens == 9
    assert len(r.itl) == 2 and r.ttft > 0 and r.latency >= r.ttft        # three content chunks: two gaps
    assert seen["ignore_eos"] is True and seen["min_tokens"] == 4 and seen["stream_options"] == {"include_usage": True}


def test_send_one_records_http_and_stream_errors():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("chat/completions"):
            return httpx.Response(200, content=_sse([{"error": {"message": "worker lost"}}]))
        return httpx.Response(400, json={"error": {"message": "bad model"}})

    async def go(path):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            spec = RequestSpec(prompt="hi", input_len=1, output_len=2)
            return await send_one(client, "http://x/v1" + path, {}, spec, t0=0.0)

    bad, broken = asyncio.run(go("/completions")), asyncio.run(go("/chat/completions"))
    assert not bad.ok and bad.error.startswith("HTTP 400") and "bad model" in bad.error
    assert not broken.ok and "worker lost" in broken.error
