"""The web chat page (/ui) in a real headless Chromium (Debian's `chromium`, driven by
Playwright's Python package; no browser download): it streams an answer from the real server,
stops it, keeps the conversation, and renders Markdown without letting the model write HTML.

A screenshot of the stopped answer is saved under pytest's tmp dir and test-artifacts/.
"""

import json
import shutil
import time
from pathlib import Path

import pytest
import requests
from hf_models import make_model

import relaxlm
from relaxlm.server.app import ServerOptions, create_app
from relaxlm.server.background import BackgroundServer

CHROMIUM = "/usr/bin/chromium"
MODEL = "tiny-ui"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason="needs Debian's chromium (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A long context, so a stream lasts seconds (the tiny model decodes ~1,500 tokens/s) and
    # the page can be seen streaming and be stopped mid-answer.
    folder = make_model(
        tmp_path_factory.mktemp("ui"),
        arch="Qwen2ForCausalLM",
        tokenizer="bpe",
        seed=11,
        max_position_embeddings=8192,
    )
    llm = relaxlm.LLM(str(folder), max_batch_size=2)
    options = ServerOptions(served_model_name=MODEL, ui=True)
    with BackgroundServer(create_app(llm, options)) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def running_requests(server) -> float:
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("relaxlm_num_requests_running "):
            return float(line.split()[1])
    raise AssertionError("/metrics has no relaxlm_num_requests_running")


def test_ui_is_served_with_its_assets(server):
    page = requests.get(f"{server.url}/ui/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("app.js", "style.css"):
        assert f'"{asset}"' in page.text
        assert requests.get(f"{server.url}/ui/{asset}", timeout=10).status_code == 200
    assert "://" not in page.text  # no CDN: every asset is local


def test_chat_streams_stops_and_keeps_history(page, server, tmp_path):
    from playwright.sync_api import expect

    bodies: list[dict] = []

    def extend_answer(route):
        # ignore_eos: the random-weight model may otherwise end its answer before the stop.
        body = json.loads(route.request.post_data)
        bodies.append(body)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/v1/chat/completions", extend_answer)
    page.goto(f"{server.url}/ui")
    expect(page.locator("#model-fields")).to_contain_text(MODEL)
    page.fill("#max_tokens", "8000")
    page.fill("#seed", "7")
    page.fill("#temperature", "0.9")
    page.fill("#input", "Tell me a story.")
    page.press("#input", "Enter")

    answer = page.locator(".msg.assistant .body").last
    expect(page.locator(".msg.assistant.streaming")).to_have_count(1)
    expect(page.locator("#stop")).to_be_enabled()
    lengths = []  # the answer grows while the stream is open: tokens arrive one by one
    deadline = time.monotonic() + 20
    while len({n for n in lengths if n}) < 3 and time.monotonic() < deadline:
        lengths.append(len(answer.inner_text()))
        page.wait_for_timeout(30)
    assert len({n for n in lengths if n}) >= 3, f"the answer did not stream: {lengths}"
    assert page.locator(".msg.assistant.streaming").count() == 1, "finished before the stop"

    page.click("#stop")
    expect(page.locator(".msg.assistant.streaming")).to_have_count(0)
    expect(page.locator(".msg.assistant .meta").last).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    shown = answer.inner_text()
    page.wait_for_timeout(300)
    assert answer.inner_text() == shown  # nothing arrives after the stop
    conversations = page.evaluate("() => JSON.parse(localStorage['relaxlm.conversations'])")
    stopped = conversations[-1]["messages"][1]["content"]  # the raw text, before Markdown
    assert stopped and shown
    deadline = time.monotonic() + 10  # the server aborted the request (client disconnect)
    while running_requests(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_requests(server) == 0

    screenshot = tmp_path / "ui-chat.png"
    page.screenshot(path=str(screenshot), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / "ui-chat.png")
    assert screenshot.stat().st_size > 10_000

    first = bodies[0]
    assert first["model"] == MODEL and first["stream"] is True
    assert (first["max_tokens"], first["seed"], first["temperature"]) == (8000, 7, 0.9)
    assert first["messages"] == [{"role": "user", "content": "Tell me a story."}]

    # The next message carries the conversation so far, the stopped answer included.
    page.fill("#max_tokens", "4")
    page.fill("#input", "And then?")
    page.click("#send")
    expect(page.locator(".msg.assistant .meta").last).to_contain_text("finish: length")
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[1]["messages"][1]["content"] == stopped

    # The conversation survives a reload; "New chat" starts an empty one.
    page.reload()
    expect(page.locator("#history li")).to_have_count(1)
    expect(page.locator(".msg")).to_have_count(4)
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)


def test_markdown_is_rendered_and_html_escaped(page, server):
    page.goto(f"{server.url}/ui/")
    source = (
        "# Title\n**bold** and `x<y` <script>alert(1)</script>\n"
        "- one\n- two\n\n```python\nif a < b:\n    print('<b>')\n```\n"
        "[ok](https://example.com) [bad](javascript:alert(1))"
    )
    html = page.evaluate("source => renderMarkdown(source)", source)
    assert "<h2>Title</h2>" in html and "<strong>bold</strong>" in html
    assert "<code>x&lt;y</code>" in html and "&lt;script&gt;" in html and "<script>" not in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    code = "if a &lt; b:\n    print(&#39;&lt;b&gt;&#39;)"
    assert f'<code class="language-python">{code}</code>' in html
    assert '<a href="https://example.com"' in html and 'href="javascript' not in html
    # An unclosed fence (mid-stream) is still a code block.
    assert "<pre>" in page.evaluate("() => renderMarkdown('```js\\nlet x = 1')")
    # MCP progress chunks (the server's tool loop) show as tool events, as text.
    event = {"type": "tool_result", "tool": "add", "result": "<b>5</b>", "is_error": True}
    shown = page.evaluate("e => toolEventElement(e).outerHTML", event)
    assert "← add: &lt;b&gt;5&lt;/b&gt;" in shown and "failed" in shown
