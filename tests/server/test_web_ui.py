"""The browser chat UI at `/`, driven by headless Chromium against a real `rustinfer serve`.

Needs the `playwright` Python package and Debian's Chromium at /usr/bin/chromium (never
`playwright install`: no browser downloads here). Screenshots go to $RUSTINFER_SCREENSHOT_DIR,
else to the test's tmp_path; look at them after a change to the UI.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser UI test needs `pip install playwright`"
)

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="the browser UI test needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
DESKTOP = {"width": 1280, "height": 820}
PHONE = {"width": 390, "height": 844}
# Page-side checks are written as functions: a bare expression makes Playwright call eval(),
# which the page's Content-Security-Policy (no 'unsafe-eval') rightly refuses.
MODEL_READY = "() => document.querySelector('#model-pill').dataset.state === 'ready'"
LONG_PROMPT = "Write a long story about a dragon."

# Markdown the model could send: raw HTML that must stay text, code that must stay exact, and
# math in all four delimiters.
HOSTILE_HTML = "<b>x</b> <script>window.__pwned = 1</script> <img src=x onerror=window.__pwned=2>"
CODE = "if a < b && c > d:\n    print('<b>&amp;</b>', \"&lt;\")"
MARKDOWN = (
    f"Say {HOSTILE_HTML}\n\n```python\n{CODE}\n```\n\n"
    "Inline $e^{i\\pi}+1=0$ and \\(a^2+b^2=c^2\\), prices $5 and $10 stay text.\n\n"
    "$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$\n\n\\[\n\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}\n\\]\n\n"
    "| op | cost |\n|---|---|\n| `matmul` | **high** |\n"
)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("RUSTINFER_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class PageWatch:
    """Collects what would show up in the browser's console as failures."""

    def __init__(self, page, base_url: str):
        self.js_errors: list[str] = []
        self.bad_assets: list[str] = []
        page.on("pageerror", lambda err: self.js_errors.append(str(err)))

        def on_response(resp):
            # /v1 and /ready answer 4xx/5xx on purpose at times; a static file never should.
            path = resp.url.removeprefix(base_url)
            if resp.status >= 400 and not path.startswith(("/v1/", "/ready")):
                self.bad_assets.append(f"{resp.status} {resp.url}")

        page.on("response", on_response)

    def check(self):
        assert not self.js_errors, self.js_errors
        assert not self.bad_assets, self.bad_assets


def new_page(browser, base_url: str, viewport: dict):
    context = browser.new_context(viewport=viewport, base_url=base_url)
    page = context.new_page()
    page.set_default_timeout(20_000)
    return context, page, PageWatch(page, base_url)


def server_metrics(server) -> dict:
    req = urllib.request.Request(f"{server.url}/v1/metrics")
    key = getattr(server, "api_key", None)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.load(resp)


def wait_until_idle(server, timeout_s: float = 20.0) -> dict:
    """Polls the engine's running gauge until no request runs."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = server_metrics(server)
        if metrics["engine"]["running"] == 0:
            return metrics
        assert time.monotonic() < deadline, f"engine still running a request: {metrics['engine']}"
        time.sleep(0.2)


def set_settings(page, *, max_tokens: int, temperature: float, api_key: str | None):
    """Fills the settings dialog the way a person would, and saves it."""
    page.click("#open-settings")
    page.fill("#set-max-tokens", str(max_tokens))
    # Range inputs take no typing; set the value and fire `input` as a drag would.
    page.eval_on_selector(
        "#set-temperature",
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }",
        str(temperature),
    )
    if api_key:
        page.fill("#set-api-key", api_key)
    page.click("#settings-save")
    page.wait_for_selector("#settings", state="hidden")


def last_answer_text(page) -> str:
    return page.eval_on_selector_all(
        "#messages .msg.assistant",
        "els => els.length ? els.at(-1).querySelector('.msg-body').textContent : ''",
    )


def test_markdown_renderer_escapes_html_keeps_code_and_renders_math(browser, live_server, shots):
    context, page, watch = new_page(browser, live_server.url, DESKTOP)
    page.goto("/")
    result = page.evaluate(
        """async (src) => {
            const { renderMarkdown } = await import('/markdown.js');
            // Shown where an answer would be, so the screenshot shows it as a person would.
            const box = document.createElement('div');
            box.className = 'msg-body markdown';
            box.innerHTML = renderMarkdown(src);
            const msg = document.createElement('article');
            msg.className = 'msg assistant';
            msg.append(box);
            document.getElementById('messages').append(msg);
            document.getElementById('empty').hidden = true;
            return {
                bold: box.querySelectorAll('b').length,
                scripts: box.querySelectorAll('script').length,
                images: box.querySelectorAll('img').length,
                text: box.textContent,
                code: box.querySelector('pre code').textContent,
                katex: box.querySelectorAll('.katex').length,
                display: box.querySelectorAll('.katex-display').length,
                katexErrors: box.querySelectorAll('.katex-error').length,
                tableCode: box.querySelector('td code')?.textContent,
                pwned: window.__pwned ?? null,
            };
        }""",
        MARKDOWN,
    )
    # Raw HTML from the model is shown as the characters it is made of.
    assert result["bold"] == 0 and result["scripts"] == 0 and result["images"] == 0
    assert HOSTILE_HTML in result["text"]
    assert result["pwned"] is None
    # Code comes out exactly as written: no `&lt;` left over, no `&amp;lt;` doubled.
    assert result["code"] == CODE + "\n"
    # Two inline formulas, the $$ block and the \[ block; the prices are not math.
    assert result["katex"] == 4, result
    assert result["display"] == 2 and result["katexErrors"] == 0
    assert "prices $5 and $10 stay text" in result["text"]
    assert result["tableCode"] == "matmul"
    page.wait_for_timeout(300)  # let the KaTeX fonts the rendered math asked for arrive (or 404)
    page.screenshot(path=str(shots / "web_ui_markdown.png"))
    watch.check()
    context.close()


def test_chat_streams_stops_keeps_history_and_survives_reload(browser, live_server, shots):
    context, page, watch = new_page(browser, live_server.url, DESKTOP)
    bodies: list[dict] = []
    page.on(
        "request",
        lambda req: (
            bodies.append(json.loads(req.post_data))
            if req.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    page.goto("/")
    # The model name comes from /v1/models; the live panel fills from /v1/metrics.
    page.wait_for_function(MODEL_READY)
    model = page.text_content("#model-name")
    page.wait_for_function(
        "() => /^\\d+$/.test(document.querySelector('#live-requests').textContent)"
    )
    requests_before = int(page.text_content("#live-requests"))
    generated_before = int(page.text_content("#live-gen-total"))
    set_settings(page, max_tokens=400, temperature=0, api_key=getattr(live_server, "api_key", None))

    # Count re-renders of the answer, and catch the processing indicator however briefly it shows.
    page.evaluate(
        """() => {
            window.__renders = 0;
            window.__sawProcessing = false;
            new MutationObserver((records) => {
                for (const r of records) {
                    if (r.target.closest?.('.msg.assistant .msg-body')) window.__renders++;
                    for (const n of r.addedNodes) {
                        if (n.nodeType === 1 && (n.matches('.processing') || n.querySelector('.processing'))) {
                            window.__sawProcessing = true;
                        }
                    }
                }
            }).observe(document.getElementById('messages'), { childList: true, subtree: true });
        }"""
    )
    page.fill("#prompt", LONG_PROMPT)
    page.press("#prompt", "Enter")
    page.wait_for_selector("#stop", state="visible")

    # Streamed text appears and keeps growing while the answer runs.
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('#messages .msg.assistant')].at(-1);"
        " return m && m.querySelector('.msg-body').textContent.length > 0; }"
    )
    first = len(last_answer_text(page))
    page.wait_for_function(
        "(n) => [...document.querySelectorAll('#messages .msg.assistant')].at(-1)"
        ".querySelector('.msg-body').textContent.length > n + 20",
        arg=first,
    )
    assert page.evaluate("window.__sawProcessing"), "no 'processing prompt' indicator was shown"
    assert page.evaluate("window.__renders") >= 3
    page.screenshot(path=str(shots / "web_ui_streaming.png"))

    # Stop ends the answer in the page and the request in the engine.
    page.click("#stop")
    page.wait_for_selector("#send", state="visible")
    page.wait_for_selector("#messages .msg.assistant .chip.warn:text('stopped')")
    stopped_text = last_answer_text(page)
    assert len(stopped_text) > first
    wait_until_idle(live_server)
    page.wait_for_timeout(500)
    assert last_answer_text(page) == stopped_text, "text kept arriving after Stop"

    # A second turn carries the history, including the stopped answer, and ends with the
    # per-answer footer read from the usage chunk.
    set_settings(page, max_tokens=12, temperature=0, api_key=None)
    page.fill("#prompt", "Give the dragon a name.")
    page.click("#send")
    page.wait_for_selector("#send", state="visible", timeout=40_000)
    page.wait_for_selector("#messages .msg.assistant:last-child .chip:has-text('decode')")
    footer = page.text_content("#messages .msg.assistant:last-child .msg-foot")
    for label in ("TTFT", "prefill", "decode", "tok/s", "prompt", "completion"):
        assert label in footer, footer
    assert len(bodies) == 2
    first_body, second_body = bodies
    assert first_body["stream"] is True and first_body["stream_options"] == {"include_usage": True}
    assert first_body["model"] == model and first_body["max_tokens"] == 400
    assert [m["role"] for m in second_body["messages"]] == ["user", "assistant", "user"]
    # The stopped answer goes back as the Markdown it was stored as, not as rendered text.
    stored = page.evaluate(
        "JSON.parse(localStorage.getItem('rustinfer.conversations.v1'))[0].messages[1].content"
    )
    assert stored and second_body["messages"][1]["content"] == stored
    assert second_body["max_tokens"] == 12

    # The live panel moved with the work just done (its counters refresh every 2 s).
    page.wait_for_function(
        "([r, g]) => Number(document.querySelector('#live-requests').textContent) > r"
        " && Number(document.querySelector('#live-gen-total').textContent) > g",
        arg=[requests_before, generated_before],
        timeout=10_000,
    )
    wait_until_idle(live_server)
    page.screenshot(path=str(shots / "web_ui_desktop.png"))

    # Everything is kept in the browser: after a reload the conversation is listed and shown.
    page.reload()
    page.wait_for_selector("#conv-list .conv-item.active")
    assert page.text_content("#conv-list .conv-item.active .conv-title") == LONG_PROMPT
    assert page.locator("#messages .msg").count() == 4
    assert page.text_content("#messages .msg.user >> nth=0") == LONG_PROMPT
    assert last_answer_text(page) != ""
    reloaded_first = page.eval_on_selector_all(
        "#messages .msg.assistant", "els => els[0].querySelector('.msg-body').textContent"
    )
    assert reloaded_first.strip() == stopped_text.strip()
    assert page.locator("#messages .msg.assistant >> nth=0").locator(".chip.warn").count() == 1
    watch.check()
    context.close()


def test_phone_width_layout(browser, live_server, shots):
    context, page, watch = new_page(browser, live_server.url, PHONE)
    # A stored conversation with code, math and a table, as if from an earlier visit.
    conversation = {
        "id": "phone0001",
        "title": "Rendering check",
        "createdAt": int(time.time() * 1000) - 7_200_000,
        "updatedAt": int(time.time() * 1000) - 3_600_000,
        "messages": [
            {"role": "user", "content": "Show me <b>markdown</b>, code and math."},
            {"role": "assistant", "content": MARKDOWN, "stats": {"completion_tokens": 99}},
        ],
    }
    context.add_init_script(
        "if (!localStorage.getItem('rustinfer.conversations.v1')) {"
        f"localStorage.setItem('rustinfer.conversations.v1', {json.dumps(json.dumps([conversation]))});"
        "localStorage.setItem('rustinfer.active.v1', 'phone0001'); }"
    )
    page.goto("/")
    page.wait_for_selector("#messages .msg.assistant .katex")
    page.wait_for_function(MODEL_READY)
    # The user's <b> is text too.
    assert page.locator("#messages .msg.user b").count() == 0
    # The sidebar is a closed drawer: off-screen, and the page does not scroll sideways.
    box = page.locator("#sidebar").bounding_box()
    assert box["x"] + box["width"] <= 0
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert page.locator("#prompt").is_visible() and page.locator("#send").is_visible()
    page.wait_for_timeout(300)
    page.screenshot(path=str(shots / "web_ui_phone.png"))

    page.click("#open-sidebar")
    page.wait_for_function(
        "() => document.querySelector('#sidebar').getBoundingClientRect().left >= 0"
    )
    assert page.locator("#conv-list .conv-item").count() == 1
    page.wait_for_timeout(300)  # the drawer's slide-in transition
    page.screenshot(path=str(shots / "web_ui_phone_sidebar.png"))
    page.click("#backdrop", position={"x": PHONE["width"] - 20, "y": 400})
    page.wait_for_function(
        "() => document.querySelector('#sidebar').getBoundingClientRect().right <= 0"
    )
    watch.check()
    context.close()


def sse(*events: dict | str) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def test_errors_and_outages_are_shown(browser, live_server, shots):
    """What a person sees when things fail; the failures are injected at the network layer."""
    context, page, watch = new_page(browser, live_server.url, DESKTOP)

    # The server still loading its model: a banner, and the page keeps working.
    loading = {
        "error": {
            "message": "the model is still loading",
            "type": "service_unavailable",
            "param": None,
            "code": "model_loading",
        }
    }
    page.route("**/ready", lambda route: route.fulfill(status=503, json=loading))
    page.goto("/")
    page.wait_for_selector("#banner:not([hidden])")
    assert "loading the model" in page.text_content("#banner-text")
    page.screenshot(path=str(shots / "web_ui_loading_banner.png"))
    page.unroute("**/ready")
    page.click("#banner-retry")
    page.wait_for_selector("#banner", state="hidden")
    page.wait_for_function(MODEL_READY)

    # A 401 names the API key setting and offers the way there.
    unauthorized = {
        "error": {
            "message": "incorrect API key provided",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=401, json=unauthorized))
    page.fill("#prompt", "Hello?")
    page.press("#prompt", "Enter")
    error = page.wait_for_selector("#messages .msg-error")
    assert "incorrect API key provided" in error.text_content()
    assert "API key in Settings" in error.text_content()
    page.screenshot(path=str(shots / "web_ui_401.png"))
    page.click("#messages .msg-error button:has-text('Open settings')")
    page.wait_for_selector("#settings[open]")
    page.click("#settings-cancel")
    page.unroute("**/v1/chat/completions")

    # An error event after the stream began: the text so far stays, the error shows below it.
    stream = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Partial <i>answer</i>"}}]},
        {
            "error": {
                "message": "engine failed",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
        "[DONE]",
    )
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, body=stream, content_type="text/event-stream"),
    )
    page.click("#messages .msg-error button:has-text('Retry')")
    page.wait_for_selector("#messages .msg-error:has-text('engine failed')")
    assert last_answer_text(page).strip() == "Partial <i>answer</i>"
    assert page.locator("#messages .msg").count() == 2  # Retry replaced the failed turn
    page.screenshot(path=str(shots / "web_ui_stream_error.png"))
    watch.check()
    context.close()
