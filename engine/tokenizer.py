"""The model's tokenizer and chat template (read from the model directory), and incremental detokenization."""

from __future__ import annotations

from pathlib import Path


_SHORT = 4                 # id windows up to this long are memoized by Tokenizer.decode
_SHORT_LIMIT = 1 << 16     # entries kept before the memo starts over (~10 MB at most)


class Tokenizer:
    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        try:
            self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as e:
            raise ValueError(f"cannot load the tokenizer from {model_dir} ({type(e).__name__}: {e})") from None
        self.eos_token_id = self._tok.eos_token_id
        self.vocab_size = len(self._tok)
        self._short: dict[tuple[int, ...], str] = {}     # decode() of short id windows (a pure function of them)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False) if self._bos_free else self._tok.encode(text)

    @property
    def _bos_free(self) -> bool:
        return not getattr(self._tok, "add_bos_token", False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if len(token_ids) <= _SHORT and skip_special_tokens:
            # the detokenizer's windows (1-2 ids each step, per sequence): a dict hit instead of a ~3 us decode
            key = tuple(token_ids)
            text = self._short.get(key)
            if text is None:
                if len(self._short) >= _SHORT_LIMIT:
                    self._short.clear()
                text = self._short[key] = self._tok.decode(token_ids, skip_special_tokens=True)
            return text
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self._tok.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt (/v1/completions) instead")
        text = self._tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return self._tok.encode(text, add_special_tokens=False)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self._tok.convert_ids_to_tokens(ids)


class Detokenizer:
    """Turns a growing list of output ids into text deltas, holding back incomplete UTF-8 and partial stop strings.

    Decodes a short window (the last few ids) rather than the whole output each step.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tok = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""            # all text decoded so far (up to a stop string, if one was hit)
        self.emitted = 0          # characters of self.text already handed out
        self.stopped = False

    def push(self, new_ids: list[int]) -> str:
        """Add ids; return the text that is now safe to emit."""
        for token_id in new_ids:
            if self.stopped:
                break
            self.ids.append(token_id)
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
            full = self.tok.decode(self.ids[self.prefix_offset:])
            if full.endswith("\ufffd"):
                continue              # an incomplete UTF-8 sequence: wait for the next id
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._check_stop()
        return self._take()

    def flush(self) -> str:
        """At the end of the request: whatever was held back for partial stop strings."""
        return self._take(final=True)

    def _check_stop(self) -> None:
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True

    def _take(self, final: bool = False) -> str:
        hold = 0 if (final or self.stopped or not self.stop) else max(len(s) for s in self.stop) - 1
        end = max(self.emitted, len(self.text) - hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
