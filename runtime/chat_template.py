"""Rendering the checkpoint's own Jinja chat template with Hugging Face semantics.

Same environment as `transformers`' `apply_chat_template`: a sandbox (templates come from the
Hub and are untrusted), trim_blocks / lstrip_blocks, `{% break %}` / `{% continue %}`,
`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, and a no-op
`{% generation %}` block.
"""

import functools
import json
import logging
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from relaxlm.errors import RelaxlmError

log = logging.getLogger(__name__)


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: list[dict] | None = None,
    **extra,
) -> str:
    """The prompt text for `messages`; `extra` reaches the template as variables.

    messages: [{"role": "user", "content": "..."}, ...]; keys whose value is None are dropped,
        as transformers does (templates test for missing keys, not for None).
    """
    if not template:
        raise RelaxlmError(
            "the model has no chat template (no 'chat_template' in tokenizer_config.json and no "
            "chat_template.jinja); pass a plain text prompt instead of messages"
        )
    if not messages:
        raise RelaxlmError(
            "the chat has no messages; pass at least one {'role': ..., 'content': ...}"
        )

    def render(messages: list[dict], tools: list[dict] | None) -> str:
        try:
            return _compile(template).render(
                messages=[_normalize(m) for m in messages],
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                **extra,
            )
        except jinja2.TemplateError as e:
            raise RelaxlmError(f"the model's chat template failed: {e}") from e

    text = render(messages, tools)
    if tools and text == render(messages, None):
        # The template drops `tools` (SmolLM2's does): the model would never hear of them, and
        # tool_choice "auto" would silently do nothing.
        _warn_tools_dropped(template)
        text = render(with_tool_instructions(messages, tools), None)
    return text


# How tools reach a model whose chat template ignores them: a system message listing each
# function on one line (short: small models have small windows), asking for the Hermes
# <tool_call> replies the server parses like any other.
TOOLS_FALLBACK = (
    "You can call these functions:\n{functions}\nTo call one, reply with only "
    '<tool_call>{{"name": "<function>", "arguments": {{<arguments>}}}}</tool_call>'
)


def with_tool_instructions(messages: list[dict], tools: list[dict]) -> list[dict]:
    """`messages` with TOOLS_FALLBACK in the system message (one is added first if none)."""
    functions = "\n".join(describe_function(t.get("function", t)) for t in tools)
    note = TOOLS_FALLBACK.format(functions=functions)
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def describe_function(function: dict) -> str:
    """One line: `name(a: integer, b?: string): description` (? marks an optional argument;
    an argument's enum is listed instead of its type)."""
    params = function.get("parameters") or {}
    required = set(params.get("required") or ())
    args = []
    for name, schema in (params.get("properties") or {}).items():
        kind = schema.get("type", "any") if isinstance(schema, dict) else "any"
        if isinstance(schema, dict) and "enum" in schema:
            kind = " | ".join(json.dumps(v) for v in schema["enum"])
        args.append(f"{name}{'' if name in required else '?'}: {kind}")
    line = f"{function.get('name', '?')}({', '.join(args)})"
    description = (function.get("description") or "").strip().splitlines()
    return f"{line}: {description[0]}" if description else line


@functools.cache
def _warn_tools_dropped(template: str) -> None:
    log.warning(
        "the model's chat template ignores `tools`: they are listed in a system message instead "
        "(relaxlm.runtime.chat_template.TOOLS_FALLBACK), and <tool_call> replies are parsed as "
        "tool calls"
    )


# Older names for a message's reasoning; transformers fills in the standard one from them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize(message: dict) -> dict:
    if not isinstance(message, dict):
        raise RelaxlmError(
            f"a chat message must be a dict with 'role' and 'content', not {message!r}"
        )
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _raise_exception(message: str):
    raise RelaxlmError(f"the model's chat template rejected the messages: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training; renders as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise RelaxlmError(
            f"the model's chat template is not valid Jinja (line {e.lineno}: {e.message}); "
            "fix 'chat_template' in tokenizer_config.json or chat_template.jinja"
        ) from e
