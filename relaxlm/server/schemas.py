"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

They are the validation (a wrong field is a 400 that names it) and the OpenAPI document at
/openapi.json. Field names, defaults and ranges are OpenAI's; `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos` and `stop_token_ids` are relaxlm's (and vLLM's) extras.
Types are strict, as OpenAI's: `"max_tokens": true`, `"stream": "yes"` or `"n": 1.5` are 400s.
Unknown request fields are ignored, as OpenAI clients send fields this server has no use for,
except other servers' fields that would change the answer (REFUSED_FIELDS), which are 400s.
"""

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

_SURROGATE = re.compile("[\ud800-\udfff]")
# 2**63 - 1: the largest seed numpy takes and JSON clients send without losing precision.
_MAX_SEED = 9_223_372_036_854_775_807
_MAX_TOKEN_ID = 2**31 - 1  # ids are int32 on the device; the vocabulary check comes later
TokenId = Annotated[int, Field(ge=0, le=_MAX_TOKEN_ID)]

# vLLM's structured-output fields, and what to send this server instead: a client that sends
# one expects a constrained answer, so ignoring it would be a silent wrong answer.
REFUSED_FIELDS = {
    "guided_json": 'response_format {"type": "json_schema", "json_schema": {"name": ..., '
    '"schema": SCHEMA}}',
    "guided_regex": "response_format json_schema (only JSON is constrained here; a string "
    'field with a "pattern" where the grammar allows it)',
    "guided_choice": 'response_format json_schema with {"enum": [CHOICES]}',
    "guided_grammar": "response_format json_schema (no grammars but JSON here)",
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        data = _json_values(data)
        if not isinstance(data, dict):
            return data
        # OpenAI's API takes `null` for "the default" (clients send "stop": null, "n": null).
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None or k not in fields or fields[k].default is None
        }


def _json_values(value):
    """`value` with each lone UTF-16 surrogate (JSON may escape one: "\\udb34") replaced by
    U+FFFD, as a lenient UTF-8 decoder would (no tokenizer, and not pydantic's errors, take it),
    and each integral float as an int: JSON has one number type, 2.0 is the integer 2 (as JSON
    Schema says), while strict types refuse true and "2"."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {_json_values(k): _json_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_values(v) for v in value]
    return value


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- shared pieces ------------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormatText(_Request):
    type: Literal["text"]


class ResponseFormatJsonObject(_Request):
    type: Literal["json_object"]


class JsonSchemaSpec(_Request):
    name: str = Field("response", max_length=64)
    description: str | None = None
    # "schema" would shadow BaseModel.schema; the JSON name is kept through the alias.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
    Field(discriminator="type"),
]


class SamplingFields(_Request):
    """The sampling fields /v1/chat/completions and /v1/completions share."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=16)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = Field(None, ge=0, le=_MAX_SEED)
    user: str | None = None
    response_format: ResponseFormat | None = None
    # extras
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1: off")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    # REFUSED_FIELDS, declared so that sending one is a 400 naming it; not in the OpenAPI
    # document, where they would read as supported.
    guided_json: SkipJsonSchema[Any] = None
    guided_regex: SkipJsonSchema[Any] = None
    guided_choice: SkipJsonSchema[Any] = None
    guided_grammar: SkipJsonSchema[Any] = None

    @field_validator(*REFUSED_FIELDS)
    @classmethod
    def _refused(cls, value, info: ValidationInfo):
        if value is not None:
            raise ValueError(
                f"{info.field_name} is not supported by this server; send "
                f"{REFUSED_FIELDS[info.field_name]}"
            )
        return value


# -- chat ---------------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageUrl(_Request):
    url: str = Field(min_length=1)  # data:image/...;base64,... or http(s)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; LLaVA has one resolution


class ImagePart(_Request):
    """An image for a vision-language model (runtime/vision.py)."""

    type: Literal["image_url"]
    image_url: ImageUrl


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionSpec(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class ResponseFunctionCall(_Response):
    name: str
    arguments: str


class ResponseToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "abort"]


class ChatChoice(_Response):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- the MCP tool loop's additions (mcp_client.py) ----------------------------------------------


class McpToolRun(_Response):
    """One MCP tool call the server ran for the model, and its result."""

    round: int
    id: str | None
    server: str
    tool: str
    arguments: str | None
    result: str
    is_error: bool


class ToolLoopResponse(ChatCompletionResponse):
    """A chat completion with MCP tools run on the server side: the last round's answer."""

    mcp_trace: list[McpToolRun] = Field(default_factory=list)
    mcp_errors: list[str] | None = None  # servers not available, a round that could not run


class McpEventChunk(ChatCompletionChunk):
    """A streamed tool loop's progress, between the model's chunks: no choices, an event
    ({"type": "tool_call" | "tool_result" | "error", ...})."""

    mcp_event: dict[str, Any]


# -- completions --------------------------------------------------------------------------------

TokenIds = list[Annotated[int, Field(ge=0)]]  # beyond the vocabulary: Engine.check's 400


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="text, texts, token ids, or lists of token ids"
    )
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=16)


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- models, embeddings, tokenizer, errors ------------------------------------------------------


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "relaxlm"
    max_model_len: int | None = None
    # A LoRA adapter (as vLLM lists one): its folder, and the base model it is served on.
    root: str | None = None
    parent: str | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraAdapterRequest(_Request):
    """vLLM's POST /v1/load_lora_adapter body."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(_Request):
    """vLLM's POST /v1/unload_lora_adapter body (lora_int_id is accepted and unused)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class Embedding(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format=base64


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TokenizeRequest(_Request):
    """Either `prompt` (text) or `messages` (rendered with the chat template, and `tools`)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None
    add_special_tokens: bool = True


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: TokenIds


class DetokenizeResponse(_Response):
    prompt: str


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


# The error answers a route documents in /openapi.json (FastAPI `responses=`): bad request and
# missing key everywhere; generation routes also answer unknown model and queue full.
ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}}
GENERATION_ERRORS = {**ERRORS, 404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}}

# One Server-Sent Event as SSE clients parse it (OpenAPI 3.1 has no event-stream schema); each
# `data` is a JSON chunk, or `[DONE]`.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}
# The audio routes answer JSON (json, verbose_json), plain text (text, srt, vtt) or, with
# stream=true, events: `transcript.text.delta` {delta}, then `transcript.text.done` {text}.
TRANSCRIPTION_ANSWERS = {
    **GENERATION_ERRORS,
    200: {
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/plain": {"schema": {"type": "string"}},
            "text/event-stream": {"schema": SSE_EVENT},
        }
    },
}


class Health(_Response):
    status: Literal["ok"] = "ok"
