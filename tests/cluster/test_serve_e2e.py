"""`splitserve serve` on a local Ray cluster: disaggregated outputs equal the local engine's, token for token."""

from __future__ import annotations

import concurrent.futures as cf

import openai
import psutil
import pytest

from splitserve.engine.sampling_params import SamplingParams

from serve_process import ServeProcess, metric_value

SHORT = ["Hi", "Name a color.", "What is 2+2?", "Say yes."]
LONG = ["Explain in simple words how photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
        "Write a short story about a robot who learns to paint, set in a small coastal town during winter.",
        "Summarize: The mitochondria is the powerhouse of the cell. It produces energy through cellular "
        "respiration, converting glucose and oxygen into ATP. Cells with high energy needs contain many of them.",
        "List five tips for writing clean Python code and explain each one briefly."]
SYSTEM = "You are a careful assistant. Answer briefly and precisely, and never invent facts. " * 3


def requests_mix():
    """32 requests: short and long prompts, greedy and seeded, some sharing a long system prompt."""
    out = []
    for i in range(32):
        text = (SHORT + LONG)[i % 8]
        messages = ([{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []) + [{"role": "user", "content": text}]
        sampling = dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.9, top_p=0.95, seed=100 + i)
        out.append((messages, sampling, 12 + (i % 4) * 6))
    return out


# 1P+2D also runs conditional disaggregation at its most eager (any prefill queue lends a prompt to an idle decode
# worker), with lent prompts computed 16 tokens per step beside decodes: outputs must not depend on where, or in
# how many pieces, a prompt was prefilled
@pytest.fixture(scope="module", params=[(1, 1, ()), (1, 2, ("--local-prefill-backlog-ms", "0",
                                                              "--max-prefill-tokens-with-decodes", "16"))],
                ids=["1P+1D", "1P+2D"])
def server(request):
    prefill, decode, extra = request.param
    proc = ServeProcess("--prefill-workers", str(prefill), "--decode-workers", str(decode), "--dtype", "float32",
                        "--kv-cache-gb", "0.25", "--cpus-per-worker", "0.5", *extra)
    proc.backlog_offload = bool(extra)
    yield proc
    assert proc.stop() == 0, proc.output()[-3000:]
    # no Ray process of this server is left behind
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if any("ray::" in c or "raylet" in c
                 for c in (p.info["cmdline"] or [])) and "splitserve" in " ".join(p.info["cmdline"] or [])]
    assert not leftovers


def _expected(engine, items):
    """The local engine's outputs for (messages, sampling, max_tokens) items, in one continuous batch."""
    prompts = [engine.tokenizer.apply_chat_template(m) for m, _, _ in items]
    params = [SamplingParams(max_tokens=n, **sampling) for _, sampling, n in items]
    return [c.text for c in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def expected_mix(engine_f32):
    return _expected(engine_f32, requests_mix())


@pytest.mark.timeout(900)
def test_concurrent_outputs_equal_local_engine(server, expected_mix):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    mix = requests_mix()

    def call(item):
        messages, sampling, max_tokens = item
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages,
                                           max_tokens=max_tokens, **sampling)
        return r.choices[0].message.content

    call(mix[1])        # one prompt prefilled remotely first: the router then knows the prefill rate
    with cf.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(call, mix))
    assert got == expected_mix
    metrics = server.metrics()
    assert metric_value(metrics, "splitserve_placement_decisions_total", reason="prefill_remote") > 0
    assert metric_value(metrics, "splitserve_placement_decisions_total", reason="decode_local_short") > 0
    backlog = metric_value(metrics, "splitserve_placement_decisions_total", reason="decode_local_backlog")
    assert (backlog > 0) == server.backlog_offload
    # the shared system prompt is served from the prefix cache after the first request
    assert metric_value(metrics, "splitserve_prefix_cache_hit_tokens_total") > 0
    # every remote prefill moved KV: bytes and one timed transfer each (a prompt cached whole moves none)
    remote = metric_value(metrics, "splitserve_placement_decisions_total", reason="prefill_remote")
    moved = metric_value(metrics, "splitserve_kv_transfer_bytes_total")
    block_bytes = 30 * 2 * 16 * 3 * 64 * 4         # SmolLM2's K+V of one 16-token block, every layer, float32
    assert moved > 0 and moved % block_bytes == 0  # whole blocks: the uncached ones of each prompt
    assert 0 < metric_value(metrics, "splitserve_kv_transfer_seconds_count") <= remote


def test_bad_requests_get_4xx_and_do_not_disturb(server, engine_f32):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError, match="model"):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", max_tokens=0,
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", temperature=-1,
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context|prompt"):
        client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", max_tokens=4,
                                       messages=[{"role": "user", "content": "word " * 9000}])
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Name a color."}])
    assert [r.choices[0].message.content] == _expected(
        engine_f32, [([{"role": "user", "content": "Name a color."}], dict(temperature=0.0), 8)])
