"""The only module that reads environment variables.

Everything else receives these values explicitly (config objects, constructor arguments).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True, slots=True)
class Settings:
    cache_dir: Path          # converted model weights and tokenizers (SPLITSERVE_CACHE_DIR)
    default_model: str | None  # overrides the packaged SmolLM2 GGUF (SPLITSERVE_MODEL)
    log_level: str           # SPLITSERVE_LOG_LEVEL
    triton_interpret: bool   # TRITON_INTERPRET=1: run Triton kernels on CPU tensors (tests)
    api_key: str | None      # SPLITSERVE_API_KEY, the fallback for --api-key
    redis_url: str | None    # SPLITSERVE_REDIS_URL, the fallback for --redis-url


def load_settings() -> Settings:
    cache = _env("SPLITSERVE_CACHE_DIR") or str(Path(_env("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "splitserve")
    return Settings(
        cache_dir=Path(cache),
        default_model=_env("SPLITSERVE_MODEL"),
        log_level=_env("SPLITSERVE_LOG_LEVEL", "INFO"),
        triton_interpret=_env("TRITON_INTERPRET", "0") == "1",
        api_key=_env("SPLITSERVE_API_KEY"),
        redis_url=_env("SPLITSERVE_REDIS_URL"),
    )


settings = load_settings()
