"""Sampling is a pure function of (seed, position, logits), and follows the distribution it claims."""

from __future__ import annotations

import torch

from splitserve.engine.sampler import SampleRequest, sample, uniform_noise
from splitserve.engine.sampling_params import SamplingParams


def req(params, position=10, seed=3):
    return SampleRequest(params, seed, position, [1, 2, 3])


def test_same_seed_and_position_same_token_regardless_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 500)
    p = SamplingParams(temperature=1.0, seed=5)
    alone = [sample(logits[i:i + 1], [req(p, position=i)])[0] for i in range(4)]
    together = sample(logits, [req(p, position=i) for i in range(4)])
    assert alone == together


def test_noise_is_deterministic_and_uniform():
    a, b = uniform_noise(7, 100, 200_000), uniform_noise(7, 100, 200_000)
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 0.5) < 0.01 and 0 < a.min() and a.max() < 1
    assert not torch.equal(a, uniform_noise(7, 101, 200_000))
    assert not torch.equal(a, uniform_noise(8, 100, 200_000))


def test_sampling_matches_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    p = SamplingParams(temperature=1.0, seed=11)
    counts = torch.zeros(3)
    for pos in range(3000):
        counts[sample(logits, [req(p, position=pos)])[0]] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    seen_k = {sample(logits, [req(SamplingParams(temperature=1.0, top_k=2, seed=1), position=i)])[0] for i in range(300)}
    seen_p = {sample(logits, [req(SamplingParams(temperature=1.0, top_p=0.65, seed=1), position=i)])[0] for i in range(300)}
    assert seen_k == {0, 1} and seen_p == {0, 1}


def test_greedy_and_repetition_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.9]])
    assert sample(logits, [req(SamplingParams())]) == [1]
    penalized = SampleRequest(SamplingParams(repetition_penalty=2.0), 0, 5, [1])
    assert sample(logits, [penalized]) == [2]
