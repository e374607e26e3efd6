"""The OpenAI endpoints as plain async functions: a validated request model in, a response
model (or an async iterator of chunk models, for `stream`) out. No HTTP here: app.py serves
them, and other code (an MCP tool loop) may call them directly.

Everything that can fail is checked before the engine sees the request, so a streamed answer
never starts and then fails: errors are `ApiError`s carrying OpenAI's status and shape.
"""

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.sampler import Logprob, SamplingParams
from relaxlm.sdk import LLM, AsyncLLM, EmbeddingLLM, Prompt, RequestGroup
from relaxlm.server import schemas as s
from relaxlm.server.tools import CallDelta, ReplyParser, forced_call_schema

# No tokenizer writes text this long per token on average; a longer prompt text can never fit
# the context window, and is refused before tokenizing it, which holds the GIL (4 MB: ~5 s of
# stalled streams).
MAX_CHARS_PER_TOKEN = 32

# The chat route's function (chat_completion for a model): a request in, the response out, or
# (request.stream) its chunks; awaiting it checks the request, so errors come before any chunk.
Chat = Callable[
    [s.ChatCompletionRequest],
    Awaitable[s.ChatCompletionResponse | AsyncIterator[s.ChatCompletionChunk]],
]


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param  # the request field at fault, as "messages.0.role"
        self.type = type
        self.code = code

    def body(self) -> dict:
        error = s.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return s.ErrorResponse(error=error).model_dump()


@dataclass
class ModelContext:
    """The one model a server serves, and what its endpoints share.

    llm: the SDK's face of the model, the server's only way into it: an AsyncLLM (a text model)
        or an EmbeddingLLM.
    name: the model id clients must send.
    max_waiting: sequences waiting for a batch slot beyond which new requests get a 429.
    """

    llm: AsyncLLM | EmbeddingLLM
    name: str
    max_waiting: int = 256
    created: int = field(default_factory=lambda: int(time.time()))
    _grammars: object = None  # structured.GrammarCompiler, made on first use

    @classmethod
    def serving(cls, llm: LLM | AsyncLLM | EmbeddingLLM, name: str, max_waiting: int = 256):
        """The context for a loaded model; an LLM is served through its AsyncLLM."""
        return cls(AsyncLLM(llm) if isinstance(llm, LLM) else llm, name, max_waiting)

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.llm, EmbeddingLLM)

    @property
    def is_speech(self) -> bool:
        return getattr(self.llm.manifest, "task", None) == "transcribe"

    @property
    def is_synthesizer(self) -> bool:
        return getattr(self.llm.manifest, "task", None) == "synthesize"

    @property
    def context_window(self) -> int:
        return self.llm.manifest.context_window

    def check_model(self, model: str | None) -> None:
        self.lora_for(model)

    def loras(self) -> dict:
        """The LoRA adapters loaded into the model's slots, by name (relaxlm/sdk.py; a
        ReplicaSet's are every replica's); none for models without slots."""
        loras = getattr(self.llm, "loras", None)
        return loras() if loras is not None else {}

    def served_name(self, model: str | None) -> str:
        """The `model` a response names: the adapter the request picked, else the model."""
        return self.lora_for(model) or self.name

    def lora_for(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 for another."""
        if model is None or model == self.name:
            return None
        if model in self.loras():
            return model
        adapters = "".join(f", {name!r}" for name in self.loras())
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {self.name!r}{adapters}",
            "model",
            code="model_not_found",
        )

    def check_generates(self) -> None:
        if self.is_synthesizer:
            raise ApiError(
                400, f"{self.name} is a speech synthesizer: use /v1/audio/speech", "model"
            )
        if self.is_speech:
            raise ApiError(
                400,
                f"{self.name} is a speech recognizer: use /v1/audio/transcriptions",
                "model",
            )
        if self.is_embedding:
            raise ApiError(
                400,
                f"{self.name} is an embedding model: it has no text generation; use /v1/embeddings",
                "model",
            )

    @property
    def kv_cache_tokens(self) -> int:
        m = self.llm.metrics()
        return m.kv_pages_total * m.page_size

    def check_text_fits(self, chars: int, field: str) -> None:
        """A 400 if a prompt text of `chars` characters cannot fit the context window whatever
        it tokenizes to (see MAX_CHARS_PER_TOKEN)."""
        window = self.context_window
        if chars > window * MAX_CHARS_PER_TOKEN:
            raise ApiError(
                400,
                f"the prompt's text has {chars} characters, more than this model's context "
                f"window of {window} tokens can hold (at most {MAX_CHARS_PER_TOKEN} characters "
                "a token); shorten it",
                field,
                code="context_length_exceeded",
            )

    def check_load(self) -> None:
        # AsyncLLM.waiting counts submissions at once, so a burst cannot all pass this check
        # before the engine sees any of them (check and submit run with no await between).
        if self.llm.waiting() >= self.max_waiting:
            raise ApiError(
                429,
                f"the server is overloaded ({self.max_waiting} sequences waiting); retry later",
                type="rate_limit_error",
                code="server_overloaded",
            )

    async def grammars(self):
        """The grammar compiler, made on first use (it imports llguidance)."""
        if self._grammars is None:
            from relaxlm.server.structured import GrammarCompiler

            tokenizer = self.llm.tokenizer
            stops = sorted(set(tokenizer.eos_token_ids))
            compiler = await asyncio.to_thread(
                GrammarCompiler, tokenizer, self.llm.vocab_size, stops
            )
            self._grammars = self._grammars or compiler
        return self._grammars


# -- chat ---------------------------------------------------------------------------------------


@dataclass
class _ToolPlan:
    """How a chat request uses tools: what the template sees, how replies are parsed."""

    mode: str  # "none", "auto", "named" or "required" (see tools.ReplyParser)
    tools: list[dict]  # for the chat template; empty with tool_choice "none"
    names: set[str]
    forced_name: str | None = None
    schema: dict | None = None  # the forced reply's JSON schema


def _tool_plan(request: s.ChatCompletionRequest) -> _ToolPlan:
    tools = [t.model_dump(exclude_none=True) for t in request.tools or []]
    names = {t["function"]["name"] for t in tools}
    choice = request.tool_choice or ("auto" if tools else "none")
    if choice == "none" or (not tools and choice == "auto"):
        return _ToolPlan("none", [], names)
    if not tools:
        raise ApiError(400, f"tool_choice={choice!r} needs `tools`", "tool_choice")
    if choice == "auto":
        return _ToolPlan("auto", tools, names)
    name = None if choice == "required" else choice.function.name
    if name is not None and name not in names:
        raise ApiError(400, f"tool_choice names {name!r}, which is not in `tools`", "tool_choice")
    return _ToolPlan(
        "required" if name is None else "named", tools, names, name, forced_call_schema(tools, name)
    )


def _template_messages(messages: list[s.ChatMessage]) -> list[dict]:
    """Messages as chat templates expect them (Hugging Face's conventions)."""
    out = []
    for m in messages:
        message = {
            "role": "system" if m.role == "developer" else m.role,
            "content": _parts(m.content) if _has_image(m.content) else _text(m.content),
        }
        if m.name is not None:
            message["name"] = m.name
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _json_or_text(c)},
                }
                for c in m.tool_calls
            ]
        out.append(message)
    return out


def _text(content: str | list[s.TextPart | s.ImagePart] | None) -> str:
    if isinstance(content, list):
        return "".join(part.text for part in content if isinstance(part, s.TextPart))
    return content or ""


def _has_image(content) -> bool:
    return isinstance(content, list) and any(isinstance(p, s.ImagePart) for p in content)


def _parts(content: list[s.TextPart | s.ImagePart]) -> list[dict]:
    """Content parts as the SDK takes them (relaxlm/images.py)."""
    return [p.model_dump(exclude_none=True) for p in content]


def _json_or_text(call: s.ToolCall):
    # Templates write arguments with `tojson`: a dict, or the string when it is not JSON.
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


def chat_prompt_ids(ctx: ModelContext, messages: list[s.ChatMessage], tools: list[dict]):
    """Token ids of `messages` (and `tools`) through the model's chat template."""
    ctx.check_text_fits(sum(len(_text(m.content)) for m in messages), "messages")
    template_messages = _template_messages(messages)
    try:
        if any(_has_image(m.content) for m in messages):  # image tokens and their features
            return ctx.llm.chat_prompt(template_messages, tools)
        text = ctx.llm.apply_chat_template(template_messages, tools)
    except RelaxlmError as e:
        raise ApiError(400, str(e), "messages") from e
    return ctx.llm.tokenizer.encode(text, add_special_tokens=False)


async def chat_completion(
    ctx: ModelContext, request: s.ChatCompletionRequest
) -> s.ChatCompletionResponse | AsyncIterator[s.ChatCompletionChunk]:
    """/v1/chat/completions: the whole response, or (stream=True) its chunks."""
    ctx.check_model(request.model)
    ctx.check_generates()
    plan = _tool_plan(request)
    if any(_has_image(m.content) for m in request.messages):  # encoding waits for a step
        ids = await asyncio.to_thread(chat_prompt_ids, ctx, request.messages, plan.tools)
    else:
        ids = chat_prompt_ids(ctx, request.messages, plan.tools)
    schema = plan.schema or _response_schema(request.response_format)
    constraint = await _constraint(ctx, request.response_format, schema)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = sampling_params(
        ctx, request, ids, request.max_completion_tokens or request.max_tokens, logprobs, constraint
    )
    run = _submit(ctx, [(ids, params)], "messages")
    meta = _Meta(
        f"chatcmpl-{uuid.uuid4().hex}",
        int(time.time()),
        ctx.served_name(request.model),
        len(ids),
        logprobs is not None,
    )
    parsers = [ReplyParser(plan.mode, plan.names, plan.forced_name) for _ in range(request.n)]
    if request.stream:
        usage = request.stream_options is not None and request.stream_options.include_usage
        return _chat_chunks(ctx, run, meta, parsers, usage)
    return await _chat_response(meta, _chat_chunks(ctx, run, meta, parsers, include_usage=True))


@dataclass
class _Meta:
    id: str
    created: int
    model: str
    prompt_tokens: int
    wants_logprobs: bool
    completion_tokens: int = 0

    def usage(self) -> s.Usage:
        return s.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


async def _chat_response(
    meta: _Meta, chunks: AsyncIterator[s.ChatCompletionChunk]
) -> s.ChatCompletionResponse:
    """The whole response: the fold of its streamed chunks (the usage chunk included)."""
    content: dict[int, list[str]] = {}
    calls: dict[int, dict[int, s.ResponseToolCall]] = {}
    logprobs: dict[int, list[s.TokenLogprob]] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    async with aclosing(chunks):
        async for chunk in chunks:
            usage = chunk.usage or usage
            for c in chunk.choices:
                content.setdefault(c.index, []).append(c.delta.content or "")
                merge_tool_calls(calls.setdefault(c.index, {}), c.delta.tool_calls or [])
                logprobs.setdefault(c.index, []).extend(c.logprobs.content if c.logprobs else [])
                reasons[c.index] = c.finish_reason or reasons.get(c.index)
    choices = []
    for i in sorted(content):
        tool_calls = list(calls[i].values()) or None
        text = "".join(content[i])
        message = s.ResponseMessage(
            content=text or (None if tool_calls else ""), tool_calls=tool_calls
        )
        choices.append(
            s.ChatChoice(
                index=i,
                message=message,
                logprobs=s.ChoiceLogprobs(content=logprobs[i]) if meta.wants_logprobs else None,
                finish_reason=reasons[i],
            )
        )
    return s.ChatCompletionResponse(
        id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage
    )


def merge_tool_calls(calls: dict[int, s.ResponseToolCall], deltas: list[s.DeltaToolCall]) -> None:
    """Join streamed tool-call pieces onto `calls` by index (id and name once, arguments in
    pieces)."""
    for d in deltas:
        if d.index not in calls:
            function = s.ResponseFunctionCall(name=d.function.name or "", arguments="")
            calls[d.index] = s.ResponseToolCall(id=d.id or "", function=function)
        calls[d.index].function.arguments += d.function.arguments or ""


def _finish_reason(reason: str | None, parser: ReplyParser) -> str | None:
    if parser.num_calls and reason == "stop":
        return "tool_calls"
    return reason


async def _chat_chunks(ctx, run, meta: _Meta, parsers: list[ReplyParser], include_usage: bool):
    def chunk(choices, usage=None) -> s.ChatCompletionChunk:
        return s.ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage
        )

    async with run:
        yield chunk(
            [
                s.ChatChunkChoice(index=i, delta=s.ChatDelta(role="assistant", content=""))
                for i in range(len(parsers))
            ]
        )
        async for _, output in run:
            choices = []
            for delta in output.deltas:
                parser = parsers[delta.index]
                meta.completion_tokens += len(delta.token_ids)
                pieces = [parser.push(delta.text)]
                if delta.finish_reason is not None:
                    pieces.append(parser.finish())
                text = "".join(p.content for p in pieces)
                calls = [c for p in pieces for c in p.calls]
                reason = (
                    None
                    if delta.finish_reason is None
                    else _finish_reason(delta.finish_reason, parser)
                )
                lp = _chat_logprobs(ctx, delta.logprobs)
                if not (text or calls or reason or lp):
                    continue
                choices.append(
                    s.ChatChunkChoice(
                        index=delta.index,
                        delta=s.ChatDelta(
                            content=text or None, tool_calls=_delta_calls(calls) or None
                        ),
                        logprobs=s.ChoiceLogprobs(content=lp) if meta.wants_logprobs else None,
                        finish_reason=reason,
                    )
                )
            if choices:
                yield chunk(choices)
        if include_usage:
            yield chunk([], meta.usage())


def _delta_calls(calls: list[CallDelta]) -> list[s.DeltaToolCall]:
    return [
        s.DeltaToolCall(
            index=c.index,
            id=c.id,
            type="function" if c.id else None,
            function=s.DeltaFunctionCall(name=c.name, arguments=c.arguments),
        )
        for c in calls
    ]


def _chat_logprobs(ctx, logprobs: list[Logprob] | None) -> list[s.TokenLogprob]:
    if not logprobs:
        return []
    decode = ctx.llm.tokenizer.decode
    out = []
    for lp in logprobs:
        token = decode([lp.token_id])
        top = [
            s.TopLogprob(token=decode([t]), logprob=v, bytes=list(decode([t]).encode()))
            for t, v in lp.top
        ]
        out.append(
            s.TokenLogprob(
                token=token, logprob=lp.logprob, bytes=list(token.encode()), top_logprobs=top
            )
        )
    return out


# -- completions --------------------------------------------------------------------------------


def _completion_prompts(ctx: ModelContext, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(400, "prompt is empty; pass text or token ids", "prompt")
    ctx.check_text_fits(sum(len(p) for p in prompts if isinstance(p, str)), "prompt")
    tokenizer = ctx.llm.tokenizer
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]


async def text_completion(
    ctx: ModelContext, request: s.CompletionRequest
) -> s.CompletionResponse | AsyncIterator[s.CompletionResponse]:
    """/v1/completions: the whole response, or (stream=True) its chunks."""
    ctx.check_model(request.model)
    ctx.check_generates()
    if request.suffix:
        raise ApiError(400, "suffix (fill-in-the-middle) is not supported; leave it out", "suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise ApiError(400, "best_of must equal n (no server-side ranking)", "best_of")
    prompts = _completion_prompts(ctx, request.prompt)
    constraint = await _constraint(
        ctx, request.response_format, _response_schema(request.response_format)
    )
    runs = [
        (ids, sampling_params(ctx, request, ids, request.max_tokens, request.logprobs, constraint))
        for ids in prompts
    ]
    run = _submit(ctx, runs, "prompt")
    meta = _Meta(
        f"cmpl-{uuid.uuid4().hex}",
        int(time.time()),
        ctx.served_name(request.model),
        sum(map(len, prompts)),
        request.logprobs is not None,
    )
    echoes = [ctx.llm.tokenizer.decode(ids) if request.echo else "" for ids in prompts]
    if request.stream:
        usage = request.stream_options is not None and request.stream_options.include_usage
        return _completion_chunks(ctx, run, meta, request.n, echoes, usage)
    chunks = _completion_chunks(ctx, run, meta, request.n, echoes, include_usage=True)
    return await _completion_response(meta, len(prompts) * request.n, chunks)


async def _completion_response(
    meta: _Meta, count: int, chunks: AsyncIterator[s.CompletionResponse]
) -> s.CompletionResponse:
    """The whole response of `count` choices: the fold of its streamed chunks."""
    texts: dict[int, list[str]] = {i: [] for i in range(count)}
    logprobs = {i: s.CompletionLogprobs() for i in texts}
    reasons: dict[int, str | None] = dict.fromkeys(texts)
    usage = None
    async with aclosing(chunks):
        async for chunk in chunks:
            usage = chunk.usage or usage
            for c in chunk.choices:
                texts[c.index].append(c.text)
                part = c.logprobs or s.CompletionLogprobs()
                for token, logprob, top in zip(
                    part.tokens, part.token_logprobs, part.top_logprobs, strict=True
                ):  # the whole text's offsets run on from the chunks before
                    _append_logprob(logprobs[c.index], token, logprob, top)
                reasons[c.index] = c.finish_reason or reasons[c.index]
    choices = [
        s.CompletionChoice(
            index=i,
            text="".join(texts[i]),
            logprobs=logprobs[i] if meta.wants_logprobs else None,
            finish_reason=reasons[i],
        )
        for i in sorted(texts)
    ]
    return s.CompletionResponse(
        id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage
    )


async def _completion_chunks(ctx, run, meta: _Meta, n: int, echoes, include_usage: bool):
    def chunk(choices, usage=None) -> s.CompletionResponse:
        return s.CompletionResponse(
            id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage
        )

    async with run:
        echoed = [
            s.CompletionChoice(index=p * n + i, text=echo)
            for p, echo in enumerate(echoes)
            if echo
            for i in range(n)
        ]
        if echoed:
            yield chunk(echoed)
        async for p, output in run:
            choices = []
            for delta in output.deltas:
                meta.completion_tokens += len(delta.token_ids)
                lp = _completion_logprobs(ctx, delta.logprobs) if meta.wants_logprobs else None
                if delta.text or delta.finish_reason or delta.token_ids:
                    choices.append(
                        s.CompletionChoice(
                            index=p * n + delta.index,
                            text=delta.text,
                            logprobs=lp,
                            finish_reason=delta.finish_reason,
                        )
                    )
            if choices:
                yield chunk(choices)
        if include_usage:
            yield chunk([], meta.usage())


def _completion_logprobs(ctx, logprobs: list[Logprob] | None) -> s.CompletionLogprobs:
    """One chunk's logprobs (its text offsets start at 0)."""
    decode = ctx.llm.tokenizer.decode
    out = s.CompletionLogprobs()
    for lp in logprobs or []:
        top = {decode([t]): v for t, v in lp.top}
        _append_logprob(out, decode([lp.token_id]), lp.logprob, top)
    return out


def _append_logprob(out: s.CompletionLogprobs, token: str, logprob: float, top) -> None:
    # Each token's offset is where the one before it ended.
    out.text_offset.append((out.text_offset[-1] + len(out.tokens[-1])) if out.tokens else 0)
    out.tokens.append(token)
    out.token_logprobs.append(logprob)
    out.top_logprobs.append(top)


# -- shared: sampling, structured output, the engine -----------------------------------------


def sampling_params(
    ctx: ModelContext,
    request: s.SamplingFields,
    prompt_ids: list[int],
    max_tokens: int | None,
    logprobs: int | None,
    constraint,
) -> SamplingParams:
    """The engine's SamplingParams for a request; a 400 naming the field when one is wrong."""
    window = ctx.context_window
    if len(prompt_ids) >= window:
        raise ApiError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; this model's context window is {window} "
            "tokens, which must also hold at least one generated token; shorten the prompt",
            "messages" if isinstance(request, s.ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    room = ctx.llm.max_new_tokens(len(prompt_ids), request.n)
    if max_tokens is None:
        max_tokens = min(window - len(prompt_ids), room)
    if len(prompt_ids) + max_tokens > window:
        raise ApiError(
            400,
            f"the prompt's {len(prompt_ids)} tokens plus max_tokens={max_tokens} exceed this "
            f"model's context window of {window} tokens; lower max_tokens to at most "
            f"{window - len(prompt_ids)}, or shorten the prompt",
            "max_tokens",
            code="context_length_exceeded",
        )
    if max_tokens > room:  # the engine would cut it short, as if max_tokens had stopped it
        raise ApiError(
            400,
            f"the prompt's {len(prompt_ids)} tokens plus max_tokens={max_tokens} (n={request.n}) "
            f"need more than the server's KV cache holds ({ctx.kv_cache_tokens} tokens); lower "
            f"max_tokens to at most {room}, or serve with a larger --kv-cache-tokens",
            "max_tokens",
            code="context_length_exceeded",
        )
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=max(request.top_k, 0),
            min_p=request.min_p,
            seed=request.seed,
            n=request.n,
            stop=tuple([request.stop] if isinstance(request.stop, str) else request.stop or ()),
            stop_token_ids=_stop_token_ids(ctx, request.stop_token_ids),
            ignore_eos=request.ignore_eos,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            logit_bias=_logit_bias(request.logit_bias),
            logprobs=logprobs,
            constraint=constraint,
            lora=ctx.lora_for(request.model),
        )
    except RelaxlmError as e:
        raise ApiError(400, str(e), _field_named(str(e))) from e
    return params


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    # JSON keys are strings of ASCII digits (str.isdigit also takes "²", which int() refuses);
    # whether each id is in the vocabulary is Engine.check's question.
    out = {}
    for key, value in (bias or {}).items():
        if not re.fullmatch("[0-9]{1,10}", key):
            raise ApiError(
                400, f"logit_bias key {key[:20]!r} is not a token id (an integer)", "logit_bias"
            )
        out[int(key)] = value
    return out


def _stop_token_ids(ctx: ModelContext, ids: list[int] | None) -> tuple[int, ...]:
    vocab = ctx.llm.vocab_size
    bad = [t for t in ids or () if t >= vocab]
    if bad:
        raise ApiError(
            400,
            f"stop_token_ids {bad[:5]} lie outside the vocabulary [0, {vocab})",
            "stop_token_ids",
        )
    return tuple(ids or ())


def _field_named(message: str) -> str | None:
    # SamplingParams' errors start "SamplingParams.<field>=...".
    if message.startswith("SamplingParams."):
        return message.split(".", 1)[1].split("=", 1)[0]
    return None


def _response_schema(response_format) -> dict | None:
    if isinstance(response_format, s.ResponseFormatJsonSchema):
        return response_format.json_schema.json_schema
    return None


async def _constraint(ctx: ModelContext, response_format, schema: dict | None):
    """A SamplingParams.constraint for the request's structured output, or None."""
    if schema is None and not isinstance(response_format, s.ResponseFormatJsonObject):
        return None
    grammars = await ctx.grammars()
    try:
        if schema is None:
            compiled = await asyncio.to_thread(grammars.json_object)
        else:
            compiled = await asyncio.to_thread(grammars.json_schema, schema)
    except RelaxlmError as e:
        raise ApiError(400, str(e), "response_format") from e
    return grammars.constraint_factory(compiled)


def _submit(
    ctx: ModelContext, requests: list[tuple[Prompt, SamplingParams]], prompt_field: str
) -> RequestGroup:
    """The requests, checked (Engine.check, through the SDK) and submitted; a 400 naming the
    field at fault when one can never run, before any is submitted; a 429 when the queue is
    full."""
    ctx.check_load()
    try:
        return ctx.llm.generate_many(requests, [f"srv-{uuid.uuid4().hex}" for _ in requests])
    except RelaxlmError as e:
        raise ApiError(400, str(e), _field_named(str(e)) or prompt_field) from e
