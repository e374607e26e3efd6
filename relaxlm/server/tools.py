"""Tool calls: finding them in model output, and the JSON schemas that force them.

Models write calls in one of a few formats, all parsed here into plain `ParsedCall`s:
- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call;
- Llama 3: the whole reply is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`; several calls separated by `;`);
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the newer
  `[TOOL_CALLS]name[ARGS]{...}` per call.

With `tool_choice` "required" or a named function, the output is instead constrained by a
grammar (see structured.py) to `forced_call_schema`'s JSON, so even a weak model produces a
valid call.
"""

import json
import re
import uuid
from dataclasses import dataclass, field

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
MISTRAL_START, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
PYTHON_TAG = "<|python_tag|>"
# Text that opens a tool call in some format; a reply starting with "{" may be Llama 3's.
MARKERS = (HERMES_START, MISTRAL_START, PYTHON_TAG)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass
class CallDelta:
    """A piece of tool call `index`: its id and name come once, on its first piece."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class ReplyPiece:
    """What a reply adds for the user at one step: content text and tool-call pieces."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


class ReplyParser:
    """Splits one completion's streamed text into content and tool calls.

    mode: "none" (all content), "auto" (content until a call's marker appears; from there the
        text is held back and parsed when the reply ends), "named" (the text is the arguments of
        `forced_name`, streamed as they come) or "required" (the text is forced_call_schema's
        JSON, parsed when the reply ends).
    """

    def __init__(self, mode: str, tool_names: set[str], forced_name: str | None = None):
        self.mode, self.tool_names, self.forced_name = mode, tool_names, forced_name
        self.text = ""
        self.sent = 0  # characters of `text` already given out (content or arguments)
        self.holding = mode == "required"
        self.num_calls = 0

    def push(self, text: str) -> ReplyPiece:
        self.text += text
        if self.mode == "none":
            return self._release(len(self.text))
        if self.mode == "named":
            piece = ReplyPiece(calls=[CallDelta(0, text)])
            if self.num_calls == 0:  # the call's header comes with its first piece
                self.num_calls = 1
                piece.calls[0] = CallDelta(0, text, new_call_id(), self.forced_name)
            self.sent = len(self.text)
            return piece
        if self.holding:
            return ReplyPiece()
        unsent = self.text[self.sent :]
        starts = [unsent.find(m) for m in MARKERS if m in unsent]
        if self.sent == 0 and unsent.lstrip().startswith("{"):
            starts.append(0)  # maybe Llama 3's JSON call
        if starts:
            self.holding = True
            return self._release(self.sent + min(starts))
        return self._release(len(self.text) - _marker_prefix_tail(unsent, self.sent == 0))

    def finish(self) -> ReplyPiece:
        """The rest, once the reply has ended: held-back text parsed into calls, or content."""
        if self.mode == "named":
            return self.push("") if self.num_calls == 0 else ReplyPiece()
        held = self.text[self.sent :]
        self.sent = len(self.text)
        if self.mode == "required":  # the text is the call: cut short (max_tokens), no content
            calls, content = parse_forced(held, None), None
        elif self.mode == "auto" and self.holding:
            content, calls = parse_tool_calls(held, self.tool_names)
        else:
            content, calls = held, []
        self.num_calls = len(calls)
        deltas = [CallDelta(i, c.arguments, new_call_id(), c.name) for i, c in enumerate(calls)]
        return ReplyPiece(content or "", deltas)

    def _release(self, upto: int) -> ReplyPiece:
        piece = ReplyPiece(self.text[self.sent : upto])
        self.sent = upto
        return piece


def _marker_prefix_tail(text: str, at_start: bool) -> int:
    """Length of the tail of `text` to hold back: it could grow into a marker (or, at the start
    of a reply, whitespace that could precede Llama 3's "{")."""
    if at_start and not text.strip():
        return len(text)
    for keep in range(min(len(text), max(map(len, MARKERS))), 0, -1):
        if any(m.startswith(text[-keep:]) for m in MARKERS):
            return keep
    return 0


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content left for the user, calls) of a finished reply; no calls when none parse.

    tool_names: the request's functions; a Llama 3 style JSON reply naming none of them is
    content, not a call (it may be the answer the user asked for).
    """
    for parse in (_hermes, _mistral, _llama3):
        found = parse(text, tool_names)
        if found is not None and found[1]:
            return found
    return text, []


def forced_call_schema(tools: list[dict], name: str | None) -> dict:
    """The JSON schema a forced reply must follow.

    name: a named function: its arguments object alone. None ("required"): an object
    {"name": ..., "arguments": {...}} for any one of `tools`.
    """
    if name is not None:
        return _parameters(next(t for t in tools if t["function"]["name"] == name))
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "arguments": _parameters(t),
            },
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def parse_forced(text: str, name: str | None) -> list[ParsedCall]:
    """The call in a forced reply (see forced_call_schema); none if the JSON is cut short."""
    if name is not None:
        return [ParsedCall(name, text)]
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return []
    return [ParsedCall(value["name"], json.dumps(value.get("arguments", {})))]


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def _call(value, tool_names: set[str] | None, args_key: str) -> ParsedCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if tool_names is not None and value["name"] not in tool_names:
        return None
    args = value.get(args_key, value.get("arguments", value.get("parameters", {})))
    return ParsedCall(value["name"], args if isinstance(args, str) else json.dumps(args))


def _hermes(text: str, tool_names: set[str]):
    if HERMES_START not in text:
        return None
    content = text[: text.index(HERMES_START)].strip() or None
    calls = []
    # A reply cut off by EOS may miss its last closing tag.
    for block in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S):
        call = _call(_loads(block), None, "arguments")
        if call is not None:
            calls.append(call)
    return content, calls


def _mistral(text: str, tool_names: set[str]):
    if MISTRAL_START not in text:
        return None
    content = text[: text.index(MISTRAL_START)].strip() or None
    calls = []
    for part in text.split(MISTRAL_START)[1:]:
        if MISTRAL_ARGS in part:  # name[ARGS]{...}
            name, args = part.split(MISTRAL_ARGS, 1)
            if _loads(args) is not None:
                calls.append(ParsedCall(name.strip(), args.strip()))
            continue
        value = _loads(part)
        for item in value if isinstance(value, list) else [value]:
            call = _call(item, None, "arguments")
            if call is not None:
                calls.append(call)
    return content, calls


def _llama3(text: str, tool_names: set[str]):
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].strip()
    if not body.startswith("{"):
        return None
    calls = []
    for part in _split_json_objects(body):
        call = _call(_loads(part), tool_names, "parameters")
        if call is None:
            return None  # not all of it is calls: it is content
        calls.append(call)
    return None, calls


def _split_json_objects(text: str) -> list[str]:
    """`{...}; {...}` into its objects (Llama 3's parallel calls)."""
    decoder, parts, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            _, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return [text[i:]]  # let the caller see the bad part
        parts.append(text[i:end])
        i = end
        while i < len(text) and text[i] in " \n\t;":
            i += 1
    return parts


def _loads(text: str):
    try:
        return json.loads(text.strip())
    except json.JSONDecodeError:
        return None
