"""Pydantic models of the OpenAI-compatible HTTP API: requests (strictly typed) and responses.

Requests are strict: a string where a number belongs is a 400 naming the field, not a silent coercion. Unknown
fields are ignored (OpenAI clients send fields this server does not use); fields it knows but does not support
(n > 1, logprobs, penalties other than repetition_penalty) are refused with a 400 naming them.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str | None = Field(None, description="The served model's id (GET /v1/models); omitted = that one.")
    max_tokens: int | None = Field(None, description="Most tokens to generate.")
    temperature: float | None = Field(None, description="0 = greedy (the default).")
    top_p: float | None = None
    top_k: int | None = Field(None, description="Extension: keep the k most likely tokens; 0 or -1 = off.")
    seed: int | None = Field(None, description="With temperature > 0, the same seed gives the same output.")
    stop: str | list[str] | None = None
    n: int | None = Field(None, description="Only 1 is supported.")
    repetition_penalty: float | None = Field(None, description="Extension: > 1 discourages repeats.")
    ignore_eos: bool | None = Field(None, description="Extension: keep generating past end-of-sequence.")
    presence_penalty: float | None = Field(None, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, description="Only 0 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="Text, or token ids; a list of one text / one id list is accepted, larger batches not.")
    echo: bool | None = Field(None, description="Only false is supported.")
    logprobs: int | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, description="Only 1 is supported.")
    suffix: str | None = Field(None, description="Not supported.")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, description="Same as max_tokens (the newer name).")
    logprobs: bool | None = Field(None, description="Only false is supported.")
    top_logprobs: int | None = Field(None, description="Not supported.")


# ---- responses ---------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "splitserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def usage(num_prompt: int, num_output: int, num_cached: int = 0) -> Usage:
    return Usage(prompt_tokens=num_prompt, completion_tokens=num_output, total_tokens=num_prompt + num_output,
                 prompt_tokens_details={"cached_tokens": num_cached})
