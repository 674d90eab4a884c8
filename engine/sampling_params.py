"""Per-request sampling parameters, validated on construction (errors name the field)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = no top-k cut
    repetition_penalty: float = 1.0   # 1 = off
    seed: int | None = None           # None with temperature > 0: the engine draws one and records it
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop) if not isinstance(self.stop, str) else (self.stop,)
        self.stop_token_ids = tuple(self.stop_token_ids)
        _check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens > 0,
               "max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        _check(_number(self.temperature) and self.temperature >= 0, "temperature",
               f"must be a number >= 0, got {self.temperature!r}")
        _check(_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"must be an integer >= 0, got {self.top_k!r}")
        _check(_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               f"must be a number > 0, got {self.repetition_penalty!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed",
               f"must be an integer in [0, 2**63), got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"], d["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        return cls(**{k: (tuple(v) if k in ("stop", "stop_token_ids") else v) for k, v in d.items()})


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
