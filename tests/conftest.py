"""Shared fixtures: one real SmolLM2 engine (float32, CPU) and the HF transformers reference, each loaded once."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def engine_f32():
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(dtype="float32", num_kv_blocks=256, max_num_seqs=16, verbose=False))


@pytest.fixture(scope="session")
def hf_model():
    """HF transformers' own GGUF loader on the same packaged file: the reference we must match."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from splitserve.engine.loader.resolve import packaged_model_path

    hf_logging.set_verbosity_error()
    path = packaged_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
