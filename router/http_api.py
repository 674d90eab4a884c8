"""The OpenAI-compatible HTTP API (FastAPI) in front of any `GenerationService`.

    POST /v1/completions        text or token-id prompt; JSON or server-sent events
    POST /v1/chat/completions   chat messages through the model's chat template; JSON or server-sent events
    GET  /v1/models, /v1/models/{id}
    GET  /health                open even with an API key
    GET  /metrics               Prometheus text format

The response `id` is the request id, also sent as the `x-request-id` header (a client may choose it by sending
that header). Every route but /health needs the API key when one is set.
"""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .auth import HTTPAuthMiddleware
from .http_admin import install_admin_routes
from .http_errors import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware, error_response, install_error_handlers
from .http_streaming import ClientGone, collect, sse_events
from .metrics import CONTENT_TYPE, Metrics
from .openai_protocol import (AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                              ChatMessage, CompletionChoice, CompletionRequest, CompletionResponse, ErrorResponse,
                              ModelCard, ModelList, StreamOptions, TextPart, usage)
from .prompts import check_text, check_token_ids, encode_chat, encode_text, invalid, sampling_params
from .service import GenerateRequest, GenerationService

_UNAUTHORIZED = {401: {"model": ErrorResponse, "description": "Missing or wrong API key."}}
_ERRORS = {400: {"model": ErrorResponse, "description": "Bad input; `error.param` names the field."},
           413: {"model": ErrorResponse, "description": "Body past the size limit."}, **_UNAUTHORIZED}
_CREATED = int(time.time())
COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16


def create_app(service: GenerationService, metrics: Metrics | None = None, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="splitserve", version="1", description=__doc__.split("\n\n")[0])
    metrics = metrics or getattr(service, "metrics", None) or Metrics(service.model_name)
    install_error_handlers(app, _known_fields())
    _strip_422(app)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        _refuse_unsupported(body, echo=bool(body.echo), logprobs=body.logprobs is not None,
                            best_of=body.best_of not in (None, 1), suffix=body.suffix is not None)
        ids = await _completion_prompt(service, body.prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        rid = await service.submit(_request(body, ids, max_tokens, _request_id(request, "cmpl")))
        return await _respond(service, rid, body, "completion", request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = [{"role": m.role, "content": _content(m.content, f"messages[{i}].content")}
                    for i, m in enumerate(body.messages)]
        _refuse_unsupported(body, logprobs=bool(body.logprobs), top_logprobs=bool(body.top_logprobs))
        ids = await encode_chat(service, messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:                      # as OpenAI: up to the context
            max_tokens = max(1, _context_limit(service) - len(ids))
        rid = await service.submit(_request(body, ids, max_tokens, _request_id(request, "chatcmpl")))
        return await _respond(service, rid, body, "chat", request)

    @app.get("/v1/models", response_model=ModelList, responses=_UNAUTHORIZED)
    async def models() -> ModelList:
        return ModelList(data=[_card(service)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={
        404: {"model": ErrorResponse, "description": "Not the served model."}, **_UNAUTHORIZED})
    async def model(model_id: str):
        if model_id != service.model_name:
            return error_response(404, f"model {model_id!r} is not served here", "model")
        return _card(service)

    @app.get("/health")
    async def health():
        if getattr(service, "healthy", True) is False:
            return error_response(503, "the service is not ready")
        return {"status": "ok"}

    @app.get("/metrics", responses=_UNAUTHORIZED)
    async def metrics_text():
        metrics.set_load(service.load())
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    install_admin_routes(app, service)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(HTTPAuthMiddleware, api_key=api_key)    # added last: runs first
    return app


# ---- building the request -------------------------------------------------------------------------------------
async def _completion_prompt(service: GenerationService, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid(f"prompt: batched prompts ({len(prompt)} of them) are not supported; send one prompt "
                          "per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return await encode_text(service, prompt)
    return check_token_ids(prompt)


def _content(content: str | list[TextPart] | None, field: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return check_text(content, field, allow_empty=True)
    return "".join(check_text(p.text, field, allow_empty=True) for p in content)


def _refuse_unsupported(body, **flags: bool) -> None:
    if body.n not in (None, 1):
        raise invalid(f"n: only n=1 is supported, got {body.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise invalid(f"{name}: only 0 is supported (use repetition_penalty)", name)
    for name, used in flags.items():
        if used:
            raise invalid(f"{name}: not supported by this server", name)


def _request(body, prompt_ids: list[int], max_tokens: int, request_id: str) -> GenerateRequest:
    stop = body.stop
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise invalid(f"stop: at most {MAX_STOP_STRINGS} stop strings", "stop")
    for s in ([stop] if isinstance(stop, str) else stop or []):
        check_text(s, "stop")
    field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    try:
        params = sampling_params(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                 top_k=0 if body.top_k == -1 else body.top_k, seed=body.seed, stop=stop,
                                 repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos)
    except Exception as e:
        if getattr(e, "field", None) == "max_tokens" and field != "max_tokens":
            e.message, e.field = e.message.replace("max_tokens", field, 1), field
        raise
    return GenerateRequest(prompt_token_ids=prompt_ids, params=params, request_id=request_id, model=body.model)


def _request_id(request: Request, prefix: str) -> str:
    return request.headers.get("x-request-id") or f"{prefix}-{uuid.uuid4().hex}"


def _context_limit(service: GenerationService) -> int:
    info, load = service.model_info(), service.load()
    return min(info.max_model_len, load.num_total_blocks * info.block_size or info.max_model_len)


def _card(service: GenerationService) -> ModelCard:
    return ModelCard(id=service.model_name, created=_CREATED, max_model_len=service.model_info().max_model_len)


# ---- responding -------------------------------------------------------------------------------------------------
async def _respond(service: GenerationService, rid: str, body, kind: str, request: Request):
    headers = {"x-request-id": rid}
    model = service.model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse_events(service, rid, model, kind, include_usage), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})
    try:
        out = await collect(service, rid, request)
    except ClientGone:
        return Response(status_code=499)
    if out.finish_reason == "error":
        return error_response(500, out.error or "generation failed", None, headers)
    u = usage(out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens)
    if kind == "completion":
        resp = CompletionResponse(id=rid, model=model, usage=u,
                                  choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)])
    else:
        resp = ChatCompletionResponse(id=rid, model=model, usage=u, choices=[
            ChatChoice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason)])
    return JSONResponse(resp.model_dump(), headers=headers)


def _known_fields() -> set[str]:
    names: set[str] = set()
    for model in (CompletionRequest, ChatCompletionRequest, ChatMessage, StreamOptions, TextPart):
        names |= set(model.model_fields)
    return names


def _strip_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body; this API answers 400 instead, so say so in the schema."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
