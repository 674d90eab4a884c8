"""Turning what a client sent (text, token ids, chat messages, sampling fields) into a `GenerateRequest`.

Shared by the HTTP and gRPC front ends so both reject the same bad input with the same message, always a
`ServiceError("invalid_argument", ..., field)` that names the offending field.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from splitserve.engine.sampling_params import SamplingParams

from .service import GenerationService, ServiceError

CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")
_tokenizer_lock = threading.Lock()   # HF fast tokenizers are not safe to call from several threads at once


def invalid(message: str, field: str | None) -> ServiceError:
    return ServiceError("invalid_argument", message, field)


def check_text(text: Any, field: str, allow_empty: bool = False) -> str:
    if not isinstance(text, str):
        raise invalid(f"{field} must be a string", field)
    if not text and not allow_empty:
        raise invalid(f"{field} is empty: send a non-empty string", field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{field} is not valid UTF-8 (it contains an unpaired surrogate)", field) from None
    return text


def _encode_sync(service: GenerationService, text: str, field: str) -> list[int]:
    with _tokenizer_lock:
        try:
            return service.tokenizer().encode(text)
        except Exception as e:        # the tokenizer refusing some input is the input's fault
            raise invalid(f"{field} could not be tokenized: {e}", field) from None


def _chat_sync(service: GenerationService, messages: list[dict], field: str) -> list[int]:
    with _tokenizer_lock:
        try:
            return service.tokenizer().apply_chat_template(messages)
        except ValueError as e:
            raise invalid(f"{field}: {e}", field) from None
        except Exception as e:        # jinja templates raise their own errors for message orders they refuse
            raise invalid(f"{field} could not be rendered with the chat template: {e}", field) from None


async def encode_text(service: GenerationService, text: Any, field: str = "prompt") -> list[int]:
    text = check_text(text, field)
    ids = await asyncio.to_thread(_encode_sync, service, text, field)
    if not ids:
        raise invalid(f"{field} tokenizes to nothing: send some text", field)
    return ids


async def encode_chat(service: GenerationService, messages: list[dict], field: str = "messages") -> list[int]:
    """`messages`: [{"role": ..., "content": str}] (content parts already joined)."""
    if not messages:
        raise invalid(f"{field} is empty: send at least one message", field)
    clean = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise invalid(f"{field}[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                          f"{field}[{i}].role")
        check_text(content, f"{field}[{i}].content", allow_empty=True)
        clean.append({"role": "system" if role == "developer" else role, "content": content})
    return await asyncio.to_thread(_chat_sync, service, clean, field)


def check_token_ids(ids: Any, field: str = "prompt") -> list[int]:
    if not isinstance(ids, list) or not ids:
        raise invalid(f"{field} is empty: send at least one token id", field)
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise invalid(f"{field} token ids must be non-negative integers", field)
    return list(ids)


def sampling_params(**fields: Any) -> SamplingParams:
    """SamplingParams from the fields a client set (None = default); its ValueError names the field."""
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as e:
        message = str(e)
        name = message.split(" ", 1)[0]
        raise invalid(message, name if name in SamplingParams.__dataclass_fields__ else None) from None
    except TypeError as e:
        raise invalid(str(e), None) from None
