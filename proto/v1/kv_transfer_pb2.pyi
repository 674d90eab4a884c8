from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayoutInfo(_message.Message):
    __slots__ = ("model_id", "dtype", "num_layers", "block_size", "total_kv_heads", "head_dim", "tp_size", "tp_rank", "fingerprint")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dtype: str
    num_layers: int
    block_size: int
    total_kv_heads: int
    head_dim: int
    tp_size: int
    tp_rank: int
    fingerprint: str
    def __init__(self, model_id: _Optional[str] = ..., dtype: _Optional[str] = ..., num_layers: _Optional[int] = ..., block_size: _Optional[int] = ..., total_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., tp_size: _Optional[int] = ..., tp_rank: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class KVTransferPlan(_message.Message):
    __slots__ = ("request_id", "attempt", "receiver", "num_tokens", "block_indices", "head_start", "head_end", "receiver_tp_rank", "link_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDICES_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    HEAD_END_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_TP_RANK_FIELD_NUMBER: _ClassVar[int]
    LINK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    receiver: KVLayoutInfo
    num_tokens: int
    block_indices: _containers.RepeatedScalarFieldContainer[int]
    head_start: int
    head_end: int
    receiver_tp_rank: int
    link_token: str
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., receiver: _Optional[_Union[KVLayoutInfo, _Mapping]] = ..., num_tokens: _Optional[int] = ..., block_indices: _Optional[_Iterable[int]] = ..., head_start: _Optional[int] = ..., head_end: _Optional[int] = ..., receiver_tp_rank: _Optional[int] = ..., link_token: _Optional[str] = ...) -> None: ...

class KVTransferReply(_message.Message):
    __slots__ = ("accepted", "error", "sender", "link_generation", "cancelled_by_receiver")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    LINK_GENERATION_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_BY_RECEIVER_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    error: str
    sender: KVLayoutInfo
    link_generation: int
    cancelled_by_receiver: bool
    def __init__(self, accepted: _Optional[bool] = ..., error: _Optional[str] = ..., sender: _Optional[_Union[KVLayoutInfo, _Mapping]] = ..., link_generation: _Optional[int] = ..., cancelled_by_receiver: _Optional[bool] = ...) -> None: ...

class KVPageRun(_message.Message):
    __slots__ = ("request_id", "attempt", "layer", "first", "count", "num_heads", "payload_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    layer: int
    first: int
    count: int
    num_heads: int
    payload_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., layer: _Optional[int] = ..., first: _Optional[int] = ..., count: _Optional[int] = ..., num_heads: _Optional[int] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class KVPageHeader(_message.Message):
    __slots__ = ("kind", "runs", "request_id", "attempt", "error")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PAGES: _ClassVar[KVPageHeader.Kind]
        ABORT: _ClassVar[KVPageHeader.Kind]
    PAGES: KVPageHeader.Kind
    ABORT: KVPageHeader.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    kind: KVPageHeader.Kind
    runs: _containers.RepeatedCompositeFieldContainer[KVPageRun]
    request_id: str
    attempt: int
    error: str
    def __init__(self, kind: _Optional[_Union[KVPageHeader.Kind, str]] = ..., runs: _Optional[_Iterable[_Union[KVPageRun, _Mapping]]] = ..., request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class KVTransferAck(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...
