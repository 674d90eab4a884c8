"""Request checks every GenerationService applies before anything is queued (errors name the field)."""

from __future__ import annotations

from .service import GenerateRequest, ServiceError

MAX_REQUEST_ID_LEN = 256


def validate_request(request: GenerateRequest, model_name: str, vocab_size: int, max_model_len: int) -> None:
    if request.model not in (None, "", model_name):
        raise ServiceError("invalid_argument", f"model {request.model!r} is not served here; this server serves "
                           f"{model_name!r}", "model")
    rid = request.request_id
    if rid is not None and (not isinstance(rid, str) or not rid or len(rid) > MAX_REQUEST_ID_LEN
                            or not rid.isprintable() or "/" in rid):
        raise ServiceError("invalid_argument", f"request_id must be 1..{MAX_REQUEST_ID_LEN} printable characters "
                           "without '/'", "request_id")
    ids = request.prompt_token_ids
    if not ids:
        raise ServiceError("invalid_argument", "prompt is empty: send at least one token", "prompt")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        raise ServiceError("invalid_argument", f"prompt token ids must be integers in [0, {vocab_size})", "prompt")
    if len(ids) >= max_model_len:
        raise ServiceError("invalid_argument", f"prompt has {len(ids)} tokens; the context is {max_model_len} tokens "
                           "(prompt must be shorter)", "prompt")
    if len(ids) + request.params.max_tokens > max_model_len:
        raise ServiceError("invalid_argument", f"max_tokens={request.params.max_tokens} with a {len(ids)}-token "
                           f"prompt exceeds the {max_model_len}-token context; lower max_tokens to at most "
                           f"{max_model_len - len(ids)}", "max_tokens")
