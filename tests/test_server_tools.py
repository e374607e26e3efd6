"""The server's pure parts, without a model: tool-call parsing in each format (whole and
streamed piece by piece), forced-call schemas, and grammar constraints in the sampler."""

import json
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
from hf_models import make_tokenizer

from relaxlm.runtime.sampler import Sampler, SamplingParams, sample_batch
from relaxlm.runtime.tokenizer import Tokenizer
from relaxlm.server.tools import ReplyParser, forced_call_schema, parse_forced, parse_tool_calls

NAMES = {"get_weather", "add"}


@pytest.mark.parametrize(
    "text, content, calls",
    [
        (  # Hermes / Qwen, with text before the call
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            "\n</tool_call>",
            "Let me check.",
            [("get_weather", {"city": "Paris"})],
        ),
        (  # two Hermes calls, the last one cut off by EOS before its closing tag
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}',
            None,
            [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})],
        ),
        (  # Llama 3 JSON, with python_tag, two calls
            '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
            '{"name": "get_weather", "parameters": {"city": "Rome"}}',
            None,
            [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})],
        ),
        (  # Mistral v3
            '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
            None,
            [("get_weather", {"city": "Oslo"})],
        ),
        (  # Mistral v11
            '[TOOL_CALLS]add[ARGS]{"a": 5, "b": 6}',
            None,
            [("add", {"a": 5, "b": 6})],
        ),
        # JSON that names no tool is an answer, not a call.
        ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
        ("Just text.", "Just text.", []),
        ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ],
)
def test_parse_tool_calls_in_each_format(text, content, calls):
    got_content, got = parse_tool_calls(text, NAMES)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


def streamed(mode: str, text: str, step: int, forced: str | None = None):
    """Feed `text` in pieces of `step` characters: (content, {index: [id, name, args]})."""
    parser = ReplyParser(mode, NAMES, forced)
    pieces = [parser.push(text[i : i + step]) for i in range(0, len(text), step)]
    pieces.append(parser.finish())
    calls: dict[int, list] = {}
    for piece in pieces:
        for d in piece.calls:
            if d.index not in calls:
                assert d.id and d.name  # the header comes first
                calls[d.index] = [d.id, d.name, ""]
            calls[d.index][2] += d.arguments
    return "".join(p.content for p in pieces), calls, parser


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_streamed_replies_equal_whole_ones(step):
    hermes = 'Sure <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    content, calls, parser = streamed("auto", hermes, step)
    assert content == "Sure " and parser.num_calls == 1
    assert [(c[1], json.loads(c[2])) for c in calls.values()] == [("add", {"a": 1, "b": 2})]
    # Text that only looks like the start of a marker is released once it is not one.
    content, calls, _ = streamed("auto", "a <b> and <tool", step)
    assert content == "a <b> and <tool" and not calls
    content, calls, _ = streamed("none", hermes, step)
    assert content == hermes and not calls
    content, calls, _ = streamed("named", '{"a": 1, "b": 2}', step, forced="add")
    assert content == "" and calls[0][1:] == ["add", '{"a": 1, "b": 2}']
    required = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    content, calls, _ = streamed("required", required, step)
    assert content == "" and [(c[1], json.loads(c[2])) for c in calls.values()] == [
        ("add", {"a": 1, "b": 2})
    ]


@pytest.mark.parametrize("step", [1, 1000])
def test_a_forced_call_cut_short_is_no_content(step):
    # tool_choice "required" cut by max_tokens: the half call once came back as content text;
    # now the reply is empty and the route reports finish_reason "length".
    content, calls, parser = streamed("required", '{"name": "add", "argu', step)
    assert content == "" and not calls and parser.num_calls == 0


def test_content_streams_before_the_reply_ends():
    parser = ReplyParser("auto", NAMES)
    assert parser.push("Hello").content == "Hello"
    assert parser.push(" <tool").content == " "  # "<tool" may open a call: held back
    assert parser.push("s> ok").content == "<tools> ok"


def test_forced_call_schemas():
    tools = [
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_weather"}},
    ]
    assert forced_call_schema(tools, "add") == {"type": "object"}
    schema = forced_call_schema(tools, None)
    jsonschema.validate({"name": "get_weather", "arguments": {}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "nope", "arguments": {}}, schema)
    assert parse_forced('{"name": "add", "arguments": {"a": 1}}', None)[0].name == "add"
    assert parse_forced('{"name": "add", "argu', None) == []


# -- grammar constraints in the sampler -------------------------------------------------------


class OnlyEven:
    """A constraint allowing even token ids, recording what it was told."""

    def __init__(self):
        self.accepted = []

    def allowed(self, vocab_size):
        return np.arange(vocab_size) % 2 == 0

    def accept(self, token):
        self.accepted.append(token)


def test_the_sampler_applies_each_sequences_constraint():
    logits = np.random.default_rng(0).normal(0, 3, (4, 50)).astype(np.float32)
    constrained = SamplingParams(temperature=0.8, seed=1, constraint=OnlyEven)
    samplers = [Sampler(constrained), Sampler(SamplingParams(temperature=0)), Sampler(constrained)]
    samplers.append(Sampler(SamplingParams(temperature=0, constraint=OnlyEven)))
    for _ in range(20):
        tokens = [s.token_id for s in sample_batch(logits, samplers)]
        assert tokens[0] % 2 == tokens[2] % 2 == tokens[3] % 2 == 0
        assert tokens[1] == int(np.argmax(logits[1]))
    # Each sequence has its own constraint state.
    assert samplers[0].constraint is not samplers[2].constraint
    assert len(samplers[0].constraint.accepted) == 20
    assert samplers[3].constraint.accepted[0] == 2 * int(np.argmax(logits[3][::2]))


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_grammar_constraint_forces_schema_valid_json(tmp_path, kind):
    from relaxlm.server.structured import GrammarCompiler

    make_tokenizer(tmp_path, kind=kind)
    tokenizer = Tokenizer.from_dir(tmp_path)
    vocab = tokenizer.vocab_size + 5  # padded logits, as models have
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "n": {"type": "integer", "minimum": -5, "maximum": 500},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "n"],
    }
    compiler = GrammarCompiler(tokenizer, vocab, [2])
    params = SamplingParams(
        temperature=1.0,
        seed=0,
        constraint=compiler.constraint_factory(compiler.json_schema(schema)),
    )
    rng = np.random.default_rng(0)
    for trial in range(10):
        sampler, tokens = Sampler(params), []
        for _ in range(200):
            token = sample_batch(rng.normal(0, 3, (1, vocab)), [sampler])[0].token_id
            if token == 2:
                break
            tokens.append(token)
        else:
            pytest.fail(f"trial {trial} did not end: {tokenizer.decode(tokens)!r}")
        # json.loads is strict: control characters inside strings fail it.
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)


def test_structured_output_needs_neither_torch_nor_triton(tmp_path):
    """The `structured` extra is llguidance alone: a schema compiles and masks with torch,
    transformers and triton unimportable (xgrammar, its predecessor, imported torch)."""
    make_tokenizer(tmp_path)
    script = f"""
import sys
for name in ("torch", "transformers", "triton"):
    sys.modules[name] = None  # any import of them raises ImportError
from relaxlm.runtime.tokenizer import Tokenizer
from relaxlm.server.structured import GrammarCompiler
tokenizer = Tokenizer.from_dir({str(tmp_path)!r})
compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size, [2])
constraint = compiler.constraint_factory(compiler.json_object())()
allowed = constraint.allowed(tokenizer.vocab_size)
print(sorted(tokenizer.decode([int(i)]) for i in allowed.nonzero()[0]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['{']"


def test_an_unsupported_schema_is_one_clear_error(tmp_path):
    from relaxlm.errors import RelaxlmError
    from relaxlm.server.structured import GrammarCompiler

    make_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_dir(tmp_path)
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size, [2])
    with pytest.raises(RelaxlmError, match="the JSON schema is not supported: .*nope"):
        compiler.json_schema({"type": "object", "properties": {"a": {"type": "nope"}}})
