"""Greedy decoding and logits match HF transformers on the real SmolLM2 GGUF."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledBatch
from splitserve.engine.sequence import Sequence

CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
PLAIN = ["The quick brown fox", "Once upon a time, in a small village by the river,", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def prompts(engine_f32):
    return [engine_f32.encode_prompt(p, chat=True) for p in CHAT] + [engine_f32.encode_prompt(p) for p in PLAIN]


def _hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_hf_batched(engine_f32, hf_model, prompts):
    # all prompts (of different lengths) decoded together in one continuous batch
    outs = engine_f32.generate(prompts, SamplingParams(max_tokens=24))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(hf_model, prompt, 24), engine_f32.tokenizer.decode(prompt)


def test_prefill_logits_match_hf(engine_f32, hf_model, prompts):
    prompt = prompts[4]
    seq = Sequence("logits", prompt, SamplingParams(max_tokens=1))
    bm = engine_f32.block_manager
    assert bm.allocate(seq, len(prompt))
    try:
        ours = engine_f32.runner.logits(ScheduledBatch([seq], [len(prompt)]))
    finally:
        bm.free(seq)
    with torch.inference_mode():
        ref = hf_model(torch.tensor([prompt])).logits[0].float()
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)
