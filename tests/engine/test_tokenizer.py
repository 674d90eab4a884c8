"""The detokenizer's text equals one decode of all ids, with `Tokenizer.decode`'s memo of short windows."""

from __future__ import annotations

import pytest

from splitserve.engine import tokenizer as tokenizer_module
from splitserve.engine.config import EngineConfig
from splitserve.engine.loader.resolve import prepare_model
from splitserve.engine.tokenizer import Detokenizer, Tokenizer

TEXT = "The quick brown fox. Ünïcödé, 日本語のテキスト, emoji 🙂🚀 and code: def f(x): return x ** 2\n" * 3


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(prepare_model(None, EngineConfig().cache_dir, verbose=False))


def test_short_windows_decode_as_hf(tok):
    ids = tok.encode(TEXT) + [tok.eos_token_id]
    for n in (1, 2, 3, 4, 5):
        for i in range(len(ids) - n):
            window = ids[i:i + n]
            for skip in (True, False):
                assert tok.decode(window, skip_special_tokens=skip) == \
                    tok._tok.decode(window, skip_special_tokens=skip)
            assert tok.decode(window) == tok.decode(window)      # a memo hit gives the same text


def test_streamed_text_equals_one_decode(tok):
    ids = tok.encode(TEXT)
    detok = Detokenizer(tok)
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == tok._tok.decode(ids, skip_special_tokens=True)


def test_memo_is_bounded(tok, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_SHORT_LIMIT", 8)
    tok._short.clear()
    for i in range(100):
        tok.decode([i, i + 1])
        assert len(tok._short) <= 8
