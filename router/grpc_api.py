"""The public gRPC API (`splitserve.v1.Generation`, see proto/v1/api.proto) in front of any `GenerationService`.

    Generate(req)            -> submit, then stream events 1, 2, ... as Chunk ... Complete (or Error)
    Resume(id, last_seq)     -> stream events last_seq+1, ... of a running or recently finished request
    Abort / GetModelInfo / GetLoad

A client that drops its connection does not abort its request (it may Resume); the SDK sends Abort when its
iterator is closed. Errors before the first message are statuses; INVALID_ARGUMENT's details name the field.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf.message import DecodeError

from splitserve.proto.v1 import api_pb2 as pb

from .prompts import check_token_ids, encode_chat, encode_text, invalid, sampling_params
from .service import GenerateRequest, GenerationService, ServiceError, TokenEvent

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
STATUS = {"invalid_argument": grpc.StatusCode.INVALID_ARGUMENT, "not_found": grpc.StatusCode.NOT_FOUND,
          "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
          "unavailable": grpc.StatusCode.UNAVAILABLE, "internal": grpc.StatusCode.INTERNAL}
FIELD_METADATA_KEY = "splitserve-field"    # trailing metadata naming the offending field


class _Malformed:
    """What a request that is not valid protobuf (e.g. a string field that is not UTF-8) deserializes to."""

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(parse):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as e:
            return _Malformed(str(e))
    return deserialize


class GenerationServicer:
    def __init__(self, service: GenerationService) -> None:
        self.service = service

    # ---- RPCs -------------------------------------------------------------------------------------------------
    async def Generate(self, request, context):
        await _check(request, context)
        try:
            rid = await self.service.submit(await self._to_request(request))
            events = self.service.stream(rid)
        except ServiceError as e:
            await _abort(context, e)
        async for response in _responses(events, context):
            yield response

    async def Resume(self, request, context):
        await _check(request, context)
        try:
            if not request.request_id:
                raise invalid("request_id is required", "request_id")
            events = self.service.stream(request.request_id, request.last_seq)
        except ServiceError as e:
            await _abort(context, e)
        async for response in _responses(events, context):
            yield response

    async def Abort(self, request, context):
        await _check(request, context)
        if not request.request_id:
            await _abort(context, invalid("request_id is required", "request_id"))
        return pb.AbortResponse(aborted=await self.service.abort(request.request_id))

    async def GetModelInfo(self, request, context):
        await _check(request, context)
        m = self.service.model_info()
        return pb.ModelInfo(name=m.name, max_model_len=m.max_model_len, vocab_size=m.vocab_size, dtype=m.dtype,
                            block_size=m.block_size, fingerprint=m.fingerprint)

    async def GetLoad(self, request, context):
        await _check(request, context)
        load = self.service.load()
        return pb.LoadInfo(num_running=load.num_running, num_waiting=load.num_waiting,
                           kv_cache_usage=load.kv_cache_usage, num_free_blocks=load.num_free_blocks,
                           num_total_blocks=load.num_total_blocks,
                           workers=[_worker(w) for w in load.workers])

    # ---- conversion -------------------------------------------------------------------------------------------
    async def _to_request(self, req: pb.GenerateRequest) -> GenerateRequest:
        which = req.WhichOneof("prompt")
        if which == "text":
            ids = await encode_text(self.service, req.text, "text")
        elif which == "token_ids":
            ids = check_token_ids(list(req.token_ids.ids), "token_ids")
        elif which == "chat":
            ids = await encode_chat(self.service, [{"role": m.role, "content": m.content}
                                                   for m in req.chat.messages], "chat")
        else:
            raise invalid("prompt is missing: set one of text, token_ids or chat", "prompt")
        p = req.params
        params = sampling_params(**{name: getattr(p, name) for name in
                                    ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
                                    if p.HasField(name)},
                                 stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids),
                                 ignore_eos=p.ignore_eos)
        return GenerateRequest(prompt_token_ids=ids, params=params, request_id=req.request_id or None,
                               model=req.model or None)


async def _check(request, context) -> None:
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message ({request.error}); "
                            "string fields must be UTF-8")


async def _abort(context, e: ServiceError) -> None:
    if e.field:
        context.set_trailing_metadata(((FIELD_METADATA_KEY, e.field),))
    await context.abort(STATUS.get(e.kind, grpc.StatusCode.INTERNAL), e.message)


async def _responses(events, context):
    try:
        async for ev in events:
            yield to_response(ev)
    except ServiceError as e:        # a service whose stream() is lazy raises here
        await _abort(context, e)


def to_response(ev: TokenEvent) -> pb.GenerateResponse:
    if ev.finished and ev.finish_reason == "error":
        return pb.GenerateResponse(error=pb.Error(request_id=ev.request_id, seq=ev.seq, code="internal",
                                                  message=ev.error or "generation failed"))
    if ev.finished:
        usage = pb.Usage(prompt_tokens=ev.num_prompt_tokens, completion_tokens=ev.num_output_tokens,
                         cached_tokens=ev.num_cached_tokens)
        return pb.GenerateResponse(complete=pb.Complete(request_id=ev.request_id, seq=ev.seq, token_ids=ev.token_ids,
                                                        text=ev.text, finish_reason=ev.finish_reason or "stop",
                                                        usage=usage))
    return pb.GenerateResponse(chunk=pb.Chunk(request_id=ev.request_id, seq=ev.seq, token_ids=ev.token_ids,
                                              text=ev.text))


def _worker(w: dict) -> pb.WorkerLoad:
    return pb.WorkerLoad(worker_id=str(w.get("worker_id", "")), role=str(w.get("role", "")),
                         num_running=int(w.get("num_running", 0)), num_waiting=int(w.get("num_waiting", 0)),
                         kv_cache_usage=float(w.get("kv_cache_usage", 0.0)),
                         num_free_blocks=int(w.get("num_free_blocks", 0)),
                         num_total_blocks=int(w.get("num_total_blocks", 0)), state=str(w.get("state", "")),
                         num_migrating_out=int(w.get("num_migrating_out", 0)))


def add_generation_service(server: grpc.aio.Server, service: GenerationService) -> None:
    """Register the servicer, with lenient request parsing (a malformed message is INVALID_ARGUMENT, not INTERNAL)."""
    servicer = GenerationServicer(service)
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Generation"].methods:
        req_cls = getattr(pb, method.input_type.name)
        kw = {"request_deserializer": _lenient(req_cls.FromString),
              "response_serializer": getattr(pb, method.output_type.name).SerializeToString}
        impl = getattr(servicer, method.name)
        handlers[method.name] = (grpc.unary_stream_rpc_method_handler(impl, **kw) if method.server_streaming
                                 else grpc.unary_unary_rpc_method_handler(impl, **kw))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
