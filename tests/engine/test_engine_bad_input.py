"""Bad input is refused with an error naming what is wrong, and the engine keeps serving."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.loader.resolve import prepare_model
from splitserve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(top_k=-1), "top_k"), (dict(seed=-3), "seed"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_change_nothing(engine_f32):
    bm = engine_f32.block_manager
    free = bm.num_free_blocks
    limit = engine_f32.max_model_len
    with pytest.raises(ValueError, match="empty"):
        engine_f32.add_request("a", [], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        engine_f32.add_request("b", [1] * limit, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens"):
        engine_f32.add_request("c", [1] * 10, SamplingParams(max_tokens=limit))
    with pytest.raises(ValueError, match="token ids"):
        engine_f32.add_request("d", [10**9], SamplingParams())
    assert bm.num_free_blocks == free and not engine_f32.has_unfinished
    out = engine_f32.generate([engine_f32.encode_prompt("Hi")], SamplingParams(max_tokens=3))[0]
    assert len(out.token_ids) == 3


def test_missing_model_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare_model(tmp_path / "nope.gguf", tmp_path)


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match="GGUF"):
        prepare_model(bad, tmp_path / "cache")


def test_model_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="safetensors"):
        prepare_model(tmp_path, tmp_path)


def test_cli_generate_json_and_errors():
    cmd = [sys.executable, "-m", "splitserve.cli", "generate", "What is the capital of France?", "--chat",
           "--max-tokens", "8", "--dtype", "float32", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "Paris" in result["text"] and len(result["token_ids"]) <= 8
    bad = subprocess.run(cmd[:4] + ["hi", "--top-p", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "top_p" in bad.stderr
