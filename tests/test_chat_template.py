"""render_chat against `transformers`' apply_chat_template, on real models' template styles."""

import json

import pytest
import transformers
from hf_models import CHATML_TEMPLATE, make_tokenizer

from relaxlm.errors import RelaxlmError
from relaxlm.runtime.chat_template import render_chat
from relaxlm.runtime.tokenizer import Tokenizer

transformers.logging.set_verbosity_error()

# Meta-Llama-3-8B-Instruct.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2.5-Instruct (long lines wrapped): ChatML with tools, tool calls and tool responses.
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
        "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
        "{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n"
        "</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. '
            'You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
            or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Mistral-7B-Instruct-v0.1: strict user/assistant alternation, enforced with raise_exception.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

# The extras Llama 3.1-style templates use: a namespace, strftime_now, tojson(indent=4),
# {% break %} / {% continue %} and a {% generation %} block; indented, so trim/lstrip matter.
FEATURES = """{%- set ns = namespace(system='', n=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- set ns.system = message.content %}
        {%- continue %}
    {%- endif %}
    {%- set ns.n = ns.n + 1 %}
    {%- if ns.n > 3 %}{% break %}{% endif %}
    <{{ message.role }}>
    {% if message.role == 'assistant' %}
        {% generation %}{{ message.content }}{% endgeneration %}
    {% else %}
        {{ message.content }}
    {% endif %}
{%- endfor %}
Today: {{ strftime_now("%d %b %Y") }} | system: {{ ns.system }}
{%- if tools %}
Tools: {{ tools | tojson(indent=4) }}
{%- endif %}
{%- if add_generation_prompt %}<assistant>{% endif %}
"""

TEMPLATES = {"llama3": LLAMA3, "qwen25": QWEN25, "mistral": MISTRAL, "features": FEATURES}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo for a city <b>& region</b>, e.g. 'Zürich' or \"東京\"",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["°C", "°F"]}},
                "required": ["city"],
            },
        },
    }
]

CHATS = {
    "one_user": [{"role": "user", "content": "Hello!"}],
    "system_user": [
        {"role": "system", "content": "  You are terse.  "},
        {"role": "user", "content": "What is 2 + 2?\n"},
    ],
    "multi_turn_unicode": [
        {"role": "user", "content": "Bonjour, ça va? 🙂"},
        {"role": "assistant", "content": "Très bien — 日本語 <b>&amp;</b> 'quotes' \"too\""},
        {"role": "user", "content": "Again {{ not a template }} {% raw %}"},
    ],
    "long": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(7)
    ],
}

TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,  # dropped, as transformers drops None-valued keys
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    },
    {"role": "tool", "content": json.dumps({"temp": "21 °C"}, ensure_ascii=False)},
    {"role": "tool", "content": "<extra>"},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tokenizer(folder, kind="spm")
    return transformers.AutoTokenizer.from_pretrained(folder)


def hf_render(hf_tokenizer, template, messages, **kwargs):
    return hf_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, **kwargs
    )


def ours(hf_tokenizer, template, messages, **kwargs):
    specials = {"bos_token": hf_tokenizer.bos_token, "eos_token": hf_tokenizer.eos_token}
    return render_chat(template, messages, **specials, **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("template", TEMPLATES)
def test_matches_transformers(hf_tokenizer, template, chat, add_generation_prompt):
    template, messages = TEMPLATES[template], CHATS[chat]
    kwargs = {"add_generation_prompt": add_generation_prompt}
    if template is MISTRAL and messages[0]["role"] == "system":
        with pytest.raises(RelaxlmError, match="Conversation roles must alternate"):
            ours(hf_tokenizer, template, messages, **kwargs)
        with pytest.raises(Exception, match="Conversation roles must alternate"):
            hf_render(hf_tokenizer, template, messages, **kwargs)
        return
    expected = hf_render(hf_tokenizer, template, messages, **kwargs)
    assert ours(hf_tokenizer, template, messages, **kwargs) == expected


@pytest.mark.parametrize("template", ["qwen25", "features"])
def test_tools_match_transformers(hf_tokenizer, template):
    template = TEMPLATES[template]
    for messages in (TOOL_CHAT, CHATS["system_user"]):
        expected = hf_render(
            hf_tokenizer, template, messages, tools=TOOLS, add_generation_prompt=True
        )
        assert ours(hf_tokenizer, template, messages, tools=TOOLS) == expected
    rendered = ours(hf_tokenizer, template, TOOL_CHAT, tools=TOOLS)
    assert "<b>& region</b>" in rendered and "Zürich" in rendered  # no HTML escaping, no \\u00fc


def test_mistral_rejects_bad_alternation_with_the_templates_message():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(RelaxlmError, match="roles must alternate user/assistant"):
        render_chat(MISTRAL, messages)
    with pytest.raises(RelaxlmError, match="Only user and assistant roles"):
        render_chat(MISTRAL, [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


def test_extra_variables_reach_the_template():
    template = "{{ greeting }}, {{ messages[0].content }}{% if add_generation_prompt %}!{% endif %}"
    messages = [{"role": "user", "content": "world"}]
    assert render_chat(template, messages, greeting="hello") == "hello, world!"
    no_prompt = render_chat(template, messages, greeting="hi", add_generation_prompt=False)
    assert no_prompt == "hi, world"


def test_tojson_filter_like_transformers():
    value = {"b": "<é>&'", "a": [1, None]}
    assert render_chat("{{ x | tojson }}", [{}], x=value) == '{"b": "<é>&\'", "a": [1, null]}'
    indented = render_chat("{{ x | tojson(indent=2) }}", [{}], x=value)
    assert indented == json.dumps(value, indent=2, ensure_ascii=False)


def test_checkpoint_template_through_tokenizer(tmp_path):
    make_tokenizer(tmp_path, kind="spm", chat_template=LLAMA3)
    tokenizer = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = CHATS["system_user"]
    specials = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    rendered = render_chat(tokenizer.chat_template, messages, **specials)
    assert rendered == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes BOS itself, so the prompt is encoded without adding another one.
    expected_ids = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert tokenizer.encode(rendered, add_special_tokens=False) == expected_ids


def test_missing_or_broken_template_raises():
    with pytest.raises(RelaxlmError, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "hi"}])
    with pytest.raises(RelaxlmError, match="not valid Jinja"):
        render_chat("{% for m in messages %}", [{"role": "user", "content": "hi"}])
    with pytest.raises(RelaxlmError, match="no messages"):
        render_chat(LLAMA3, [])


def test_sandbox_blocks_unsafe_access():
    with pytest.raises(RelaxlmError, match="chat template failed"):
        render_chat("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "hi"}])
    with pytest.raises(RelaxlmError, match="chat template failed"):
        render_chat("{% set _ = messages.append(1) %}", [{"role": "user", "content": "hi"}])


FALLBACK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers.\nLong details the line leaves out.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer"},
                    "b": {"type": "integer"},
                    "unit": {"enum": ["m", "km"]},
                },
                "required": ["a", "b"],
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def test_tools_reach_a_template_that_drops_them(caplog):
    # This ChatML template, like SmolLM2's, never mentions `tools`: they would be lost.
    chatml = CHATML_TEMPLATE + "{# a template of its own, so its warning is not cached #}"
    with caplog.at_level("WARNING", logger="relaxlm.runtime.chat_template"):
        plain = render_chat(chatml, CHATS["system_user"])
        with_tools = render_chat(chatml, CHATS["system_user"], tools=FALLBACK_TOOLS)
        again = render_chat(chatml, [{"role": "user", "content": "hi"}], tools=FALLBACK_TOOLS)
    assert with_tools != plain
    listing = 'add(a: integer, b: integer, unit?: "m" | "km"): Add two numbers.\nnow()\n'
    assert listing in with_tools and '<tool_call>{"name": "<function>"' in with_tools
    # Appended to the chat's own system message; a chat without one gets one first.
    assert with_tools.count("<|im_start|>system") == 1
    assert CHATS["system_user"][0]["content"] in with_tools
    assert again.startswith("<|im_start|>system\nYou can call these functions:\nadd(")
    assert len([r for r in caplog.records if "ignores `tools`" in r.message]) == 1  # once
    # A template that renders tools itself is left alone.
    qwen = render_chat(TEMPLATES["qwen25"], CHATS["system_user"], tools=FALLBACK_TOOLS)
    assert "You can call these functions" not in qwen and '"name": "add"' in qwen


def test_the_default_models_template_gets_the_tools():
    """SmolLM2-135M-Instruct's real template (from the GGUF the default model ships) drops
    `tools`; with the fallback the listing reaches the prompt."""
    import gguf

    from relaxlm.default_model import default_model

    reader = gguf.GGUFReader(default_model())
    template = reader.fields["tokenizer.chat_template"].contents()
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert render_chat(template, messages, tools=[]) == render_chat(template, messages)
    prompt = render_chat(template, messages, tools=FALLBACK_TOOLS)
    assert prompt.startswith("<|im_start|>system\nYou can call these functions:\nadd(a: integer")
    assert prompt.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
