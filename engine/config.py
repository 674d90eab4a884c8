"""The engine's configuration: one dataclass, validated on construction, passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitserve.settings import settings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None             # GGUF file or HF directory; None = $SPLITSERVE_MODEL or the packaged SmolLM2
    device: str = "cpu"
    dtype: str = "auto"                  # auto = bfloat16 on CUDA and on CPUs with AMX/AVX512-BF16, else float32
    block_size: int = 16
    num_kv_blocks: int = 0               # 0 = as many as kv_cache_memory_gb holds
    kv_cache_memory_gb: float = 1.0
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 1024   # per-step token budget (chunked prefill + decodes)
    max_prefill_tokens_with_decodes: int = 0   # prompt tokens of a step that also decodes; 0 = no cap
    max_model_len: int = 0               # 0 = the model's context length
    attention_backend: str = "auto"      # torch | triton | auto
    tp: int = 1
    layer_parallel: tuple[int, int] | None = None   # [start, end) layer range evaluated in pairs
    cache_dir: Path = field(default_factory=lambda: settings.cache_dir)
    verbose: bool = True

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is visible; use --device cpu")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.max_prefill_tokens_with_decodes, int) or self.max_prefill_tokens_with_decodes < 0:
            raise ValueError("max_prefill_tokens_with_decodes must be an integer >= 0 (0 = no cap), got "
                             f"{self.max_prefill_tokens_with_decodes!r}")
        if self.num_kv_blocks < 0 or self.max_model_len < 0 or self.kv_cache_memory_gb <= 0:
            raise ValueError("num_kv_blocks and max_model_len must be >= 0 and kv_cache_memory_gb > 0")
        if self.layer_parallel is not None:
            start, end = self.layer_parallel
            if start < 0 or end < start or (end - start) % 2:
                raise ValueError(f"layer_parallel={start}:{end} must be an even-length range START:END with "
                                 "0 <= START <= END")
        self.cache_dir = Path(self.cache_dir)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[resolve_dtype(self.dtype, self.device)]


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def parse_layer_range(text: str | None) -> tuple[int, int] | None:
    """'START:END' -> (START, END); '' or None -> None."""
    if not text:
        return None
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--layer-parallel must look like START:END (e.g. 10:20), got {text!r}") from None
    return (start, end) if end > start else None
