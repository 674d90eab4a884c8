"""Fixtures for tensor- and layer-parallel tests (helpers: tp_helpers.py).

Each TPEngine spawns one follower process (TP=2 over Gloo); they are module-scoped and closed at the end."""

from __future__ import annotations

import pytest

from tp_helpers import PROMPTS


@pytest.fixture(scope="session")
def prompt_ids(engine_f32) -> list[list[int]]:
    return [engine_f32.encode_prompt(p) for p in PROMPTS]
