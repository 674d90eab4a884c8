"""Token sampling where the token at position i is a pure function of (seed, i, logits).

Random draws come from a counter-based hash of (seed, position, vocabulary index) computed with integer tensor
ops, not from a stateful generator: a request resumed on another worker, in another batch, after any number of
other requests, draws exactly the same noise and so picks exactly the same token. Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which draws from p exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons): a well-mixed 32-bit permutation; int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: int, position: int, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """U(0,1) float64 draws, one per vocabulary entry, determined by (seed, position) alone."""
    key = torch.tensor([seed & _M32, (seed >> 32) & _M32, position & _M32], dtype=torch.int64, device=device)
    k = _mix32(key[0] ^ _mix32(key[1] ^ _mix32(key[2] + 0x9E3779B9)))
    idx = torch.arange(vocab_size, dtype=torch.int64, device=device)
    h = _mix32(_mix32((idx * 0x9E3779B1) & _M32 ^ k) ^ (k >> 7))
    return (h.double() + 0.5) / 4294967296.0


@dataclass(slots=True)
class SampleRequest:
    params: SamplingParams
    seed: int
    position: int                 # index in the sequence of the token being drawn
    history: list[int]            # prompt + generated tokens (for the repetition penalty)


def sample(logits: torch.Tensor, requests: list[SampleRequest]) -> list[int]:
    """logits: [B, vocab] float32, one row per request -> one token id per row."""
    if all(r.params.greedy and r.params.repetition_penalty == 1.0 for r in requests):
        return logits.argmax(dim=-1).tolist()
    return [_sample_one(logits[i], r) for i, r in enumerate(requests)]


def _sample_one(logits: torch.Tensor, r: SampleRequest) -> int:
    p = r.params
    logits = logits.float()
    if p.repetition_penalty != 1.0 and r.history:
        seen = torch.tensor(sorted(set(r.history)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        drop = (cum - sorted_p) >= p.top_p          # keep the smallest prefix whose mass reaches top_p
        probs = probs.clone()
        probs[order[drop]] = 0.0
    noise = uniform_noise(r.seed, r.position, probs.numel(), probs.device)
    # argmax p / E, E = -log U; in log space to keep tiny probabilities ordered
    score = probs.double().log() - torch.log(-torch.log(noise))
    return int(score.argmax())
