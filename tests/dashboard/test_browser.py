"""The dashboard in real headless Chromium (Debian's, driven by Playwright): live state, restart isolation."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import System, wait_for
from tests.dashboard.conftest import MODEL_A, MODEL_B

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM) or shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("Debian chromium is missing: `make test` installs it (TEST_APT_PACKAGES)")
        pytest.skip("Debian chromium is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, two_models: System) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(f"http://127.0.0.1:{two_models.dashboard_port}/", wait_until="domcontentloaded")
    pg.errors = errors
    try:
        yield pg
    finally:
        ctx.close()
    assert not errors, errors


def _cell(model: str, field: str) -> str:
    return f'[data-model="{model}"][data-field="{field}"]'


def test_page_shows_the_running_models_live(page: Any, two_models: System) -> None:
    page.wait_for_selector('[data-field="live"]:has-text("live")', timeout=15000)
    for model in (MODEL_A, MODEL_B):
        page.wait_for_selector(_cell(model, "state") + '[data-state="ready"]', timeout=15000)
        pid = two_models.worker(model)["pid"]
        page.wait_for_function(f"""() => document.querySelector('{_cell(model, "pid")}')?.textContent.trim()
                                   === '{pid}'""", timeout=10000)
    # live figures arrive over SSE each second (uptime grows without a reload), the chart is drawn
    before = page.evaluate(f"() => window.__llamaRunner.workers['{MODEL_A}'].uptime_s")
    page.wait_for_function(f"() => window.__llamaRunner.workers['{MODEL_A}'].uptime_s > {before or 0} + 1.5",
                           timeout=10000)
    assert page.locator(_cell(MODEL_A, "chart") + " canvas").count() == 1
    assert "CPU" in page.inner_text('[data-field="system"]')
    assert page.locator('[data-table="processes"]').inner_text().count("gateway-") == 2


def _stream(system: System, model: str, out: dict[str, Any]) -> None:
    body = json.dumps({"model": model, "stream": True, "max_tokens": 400, "ignore_eos": True,
                       "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]})
    req = urllib.request.Request(system.openai_url + "/chat/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    out["times"] = []
    try:
        with urllib.request.urlopen(req, timeout=180) as resp:
            for line in resp:
                if line.startswith(b"data: {"):
                    doc = json.loads(line[6:])
                    if doc.get("choices") and doc["choices"][0].get("delta", {}).get("content"):
                        out["times"].append(time.monotonic())
                elif line.startswith(b"data: [DONE]"):
                    out["done"] = True
    except Exception as exc:  # reported by the test
        out["error"] = repr(exc)


def test_restart_click_changes_that_pid_while_another_model_streams(page: Any, two_models: System) -> None:
    page.wait_for_selector(_cell(MODEL_A, "state") + '[data-state="ready"]', timeout=15000)
    old_a, old_b = two_models.worker(MODEL_A)["pid"], two_models.worker(MODEL_B)["pid"]
    page.wait_for_function(f"() => document.querySelector('{_cell(MODEL_A, 'pid')}').textContent.trim() === '{old_a}'",
                           timeout=10000)
    out: dict[str, Any] = {}
    streamer = threading.Thread(target=_stream, args=(two_models, MODEL_B, out), daemon=True)
    streamer.start()
    wait_for(lambda: len(out.get("times", [])) >= 3 or "error" in out, 60, "the stream on the other model")
    assert "error" not in out, out
    # the dashboard shows that stream in flight on B
    page.wait_for_function(f"() => document.querySelector('{_cell(MODEL_B, 'in_flight')}').textContent.trim() === '1'",
                           timeout=10000)
    clicked = time.monotonic()
    page.click(f'[data-model="{MODEL_A}"][data-action="restart"]')
    page.wait_for_function(
        f"""() => {{ const t = document.querySelector('{_cell(MODEL_A, "pid")}').textContent.trim();
                    return /^[0-9]+$/.test(t) && t !== '{old_a}'; }}""", timeout=60000)
    page.wait_for_selector(_cell(MODEL_A, "state") + '[data-state="ready"]', timeout=60000)
    new_a = int(page.inner_text(_cell(MODEL_A, "pid")))
    assert new_a != old_a and new_a == two_models.worker(MODEL_A)["pid"]
    streamer.join(180)
    assert out.get("done") and "error" not in out, out
    after = [t for t in out["times"] if t > clicked]
    assert after, "the stream on the other model stopped while the first one restarted"
    assert two_models.worker(MODEL_B)["pid"] == old_b
    assert page.inner_text(_cell(MODEL_B, "pid")) == str(old_b)


def test_log_tail_and_models_page(page: Any, two_models: System) -> None:
    page.wait_for_selector(_cell(MODEL_A, "state") + '[data-state="ready"]', timeout=15000)
    page.click(f'[data-model="{MODEL_A}"][data-action="logs"]')
    page.wait_for_function("() => document.querySelector('[data-field=\"log\"]')?.children.length > 0",
                           timeout=15000)
    assert "llama" in page.inner_text('[data-field="log"]').lower() or page.locator(".src-llama-server").count()
    page.keyboard.press("Escape")
    page.click("#tab-models")
    page.wait_for_selector(f'{_cell(MODEL_B, "model-state")}:has-text("ready")', timeout=15000)
    assert "ctx" in page.inner_text('[data-table="models"]')
    page.click('[data-action="discover"]')  # a dry run: shows what is new under the models root
    page.wait_for_selector('[data-field="discovered"]', timeout=15000)
    text = page.inner_text('[data-field="discovered"]')
    assert "No new models under" in text or "Found under" in text, text


def test_chat_box_streams_an_answer(page: Any, two_models: System) -> None:
    page.click("#tab-chat")
    page.fill('textarea[data-field="chat-input"], [data-field="chat-input"] textarea', "Say hello.")
    page.click('[data-action="chat-send"]')
    page.wait_for_function("""() => { const m = document.querySelectorAll('[data-field="chat-log"] .msg.assistant');
                                      return m.length && m[m.length-1].textContent.replace('assistant:', '').trim().length > 0; }""",
                           timeout=60000)
    assert "[error" not in page.inner_text('[data-field="chat-log"]')


def test_reload_error_is_shown_not_thrown(page: Any, two_models: System) -> None:
    page.wait_for_selector('[data-field="live"]:has-text("live")', timeout=15000)
    page.click('[data-action="reload"]')
    page.wait_for_selector(".el-message", timeout=15000)  # success or a readable error, never a crash


def test_a_reload_shows_at_once_and_the_chat_offers_chat_models_only(page: Any, two_models: System) -> None:
    """A model added by a reload appears without reloading the page (the status reply's own "type" used to win
    over "snapshot" and the refresh was dropped); the chat box offers models that chat, the default chosen."""
    cfg = two_models.config_dir / "models_config.json"
    original = cfg.read_text()
    doc = json.loads(original)
    doc["models"]["aaa-embed"] = {**doc["models"][MODEL_A], "mode": "embedding"}  # (sorts first; not loaded)
    page.wait_for_selector('[data-field="live"]:has-text("live")', timeout=15000)
    cfg.write_text(json.dumps(doc))
    try:
        page.click('[data-action="reload"]')
        page.wait_for_selector(_cell("aaa-embed", "state"), timeout=15000)
        page.click("#tab-chat")
        page.wait_for_selector(f'[data-field="chat-model"]:has-text("{MODEL_A}")', timeout=15000)
        page.click('[data-field="chat-model"]')
        page.wait_for_selector(".el-select-dropdown__item", timeout=15000)
        offered = {t.strip() for t in page.locator(".el-select-dropdown__item").all_inner_texts()}
        assert offered == {MODEL_A, MODEL_B}, offered
    finally:
        cfg.write_text(original)
        two_models.cli("reload")


def test_actions_that_do_not_apply_to_a_state_are_disabled(page: Any, two_models: System) -> None:
    page.wait_for_selector(_cell(MODEL_A, "state") + '[data-state="ready"]', timeout=15000)
    assert page.is_disabled(f'[data-model="{MODEL_A}"][data-action="start"]')  # ready: already started
    assert page.is_enabled(f'[data-model="{MODEL_A}"][data-action="stop"]')
    assert page.is_enabled(f'[data-model="{MODEL_A}"][data-action="restart"]')


def test_a_long_worker_message_takes_two_lines_and_shows_whole_on_hover(page: Any, two_models: System) -> None:
    """A failed load's message (llama-server's last log lines: ~500 characters) made its row several lines tall."""
    cfg = two_models.config_dir / "models_config.json"
    original = cfg.read_text()
    doc = json.loads(original)
    missing = "/nonexistent/" + "very-long-directory-name/" * 12 + "gone.gguf"
    doc["models"]["gone"] = {**doc["models"][MODEL_A], "model_path": missing}
    page.wait_for_selector('[data-field="live"]:has-text("live")', timeout=15000)
    cfg.write_text(json.dumps(doc))
    try:
        assert two_models.cli("reload").returncode == 0
        req = urllib.request.Request(f"http://127.0.0.1:{two_models.ollama_port}/api/generate", method="POST",
                                     data=json.dumps({"model": "gone", "prompt": "hi", "stream": False}).encode())
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(req, timeout=60)
        cell = page.wait_for_selector(_cell("gone", "message") + ':has-text("model file not found")', timeout=30000)
        assert cell is not None
        assert missing in (cell.get_attribute("title") or "")
        line = float(page.evaluate("(e) => parseFloat(getComputedStyle(e).lineHeight) || 16", cell))
        box = cell.bounding_box()
        assert box is not None and box["height"] <= 2 * line + 2, (box, line)
    finally:
        cfg.write_text(original)
        two_models.cli("reload")


def test_the_chat_takes_an_api_key_of_its_own_and_keeps_errors_out_of_the_conversation(
        browser: Any, two_models: System) -> None:
    """With api_keys on the OpenAI port the chat could not be used: the page had no place for a key (on loopback
    it asks no dashboard token), and the one field it had was checked as the dashboard token. And an answer that
    ended in an error went back to the model as the assistant's words ("[error: ...]")."""
    cfg = two_models.config_dir / "app_config.json"
    original = cfg.read_text()
    doc = json.loads(original)
    doc["proxies"]["lmstudio"]["api_keys"] = ["sekrit-l"]
    cfg.write_text(json.dumps(doc))
    assert two_models.cli("reload").returncode == 0
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    pg = ctx.new_page()
    sent: list[Any] = []
    pg.on("request", lambda r: sent.append(json.loads(r.post_data or "{}")) if r.url.endswith("/api/chat") else None)
    try:
        pg.goto(f"http://127.0.0.1:{two_models.dashboard_port}/#chat", wait_until="domcontentloaded")
        pg.wait_for_selector('[data-field="api-key"]', timeout=15000)
        log = '[data-field="chat-log"]'
        box = 'textarea[data-field="chat-input"], [data-field="chat-input"] textarea'

        def say(text: str, n: int) -> None:
            pg.fill(box, text)
            pg.click('[data-action="chat-send"]')
            pg.wait_for_function(f"""() => {{ const m = document.querySelectorAll('{log} .msg.assistant');
                return m.length >= {n} && !document.querySelector('[data-action="chat-send"]').disabled
                  && (m[m.length-1].querySelector('.err') || m[m.length-1].textContent.replace('assistant:', '').trim()); }}""",
                                 timeout=60000)

        say("Hello?", 1)  # no key yet: the gateway's 401, shown
        assert "[error" in pg.inner_text(log) and "API key" in pg.inner_text(log), pg.inner_text(log)
        pg.fill('input[data-field="api-key"], [data-field="api-key"] input', "sekrit-l")
        say("Say hello.", 2)
        last = pg.locator(f"{log} .msg.assistant").last
        assert last.locator(".err").count() == 0 and last.inner_text().replace("assistant:", "").strip()
        assert [m["role"] for m in sent[-1]["messages"]] == ["user", "user"], sent[-1]  # (the failed answer left out)
    finally:
        ctx.close()
        cfg.write_text(original)
        two_models.cli("reload")


def test_a_loaded_model_a_reload_removes_leaves_the_page(page: Any, two_models: System) -> None:
    """Its row stayed, 'stopped', until the page was loaded again (the status the reload's event asked for came
    while it drained, and nothing removed it after)."""
    cfg = two_models.config_dir / "models_config.json"
    original = cfg.read_text()
    doc = json.loads(original)
    doc["models"]["ccc-extra"] = dict(doc["models"][MODEL_A])
    page.wait_for_selector('[data-field="live"]:has-text("live")', timeout=15000)
    try:
        cfg.write_text(json.dumps(doc))
        assert two_models.cli("reload").returncode == 0
        assert two_models.cli("start", "ccc-extra").returncode == 0
        page.wait_for_selector(_cell("ccc-extra", "state") + '[data-state="ready"]', timeout=60000)
        cfg.write_text(original)
        assert two_models.cli("reload").returncode == 0
        wait_for(lambda: "ccc-extra" not in {w["name"] for w in two_models.status()["workers"]}, 30, "removed")
        page.wait_for_selector(_cell("ccc-extra", "state"), state="detached", timeout=10000)
    finally:
        cfg.write_text(original)
        two_models.cli("reload")
        for name in (MODEL_A, MODEL_B):  # (one was evicted for it: the package's other tests find both loaded)
            two_models.cli("start", name)
        wait_for(lambda: all(w["state"] == "ready" for w in two_models.status()["workers"]), 120, "both loaded")


def test_the_models_tab_shows_the_config_the_supervisor_runs_on(two_models: System) -> None:
    """It read the files on disk: a model written there but not reloaded was listed (and offered in the chat, a
    404 there), and a changed setting was shown as if it applied."""
    cfg = two_models.config_dir / "models_config.json"
    original = cfg.read_text()
    doc = json.loads(original)
    doc["models"]["zzz-unreloaded"] = dict(doc["models"][MODEL_A])
    doc["models"][MODEL_B] = {**doc["models"][MODEL_B], "parameters": {"ctx_size": 512}}
    url = f"http://127.0.0.1:{two_models.dashboard_port}/api/models"
    try:
        cfg.write_text(json.dumps(doc))
        with urllib.request.urlopen(url, timeout=30) as r:
            listed = {m["name"]: m for m in json.loads(r.read())["models"]}
        assert "zzz-unreloaded" not in listed and listed[MODEL_B]["parameters"]["ctx_size"] != 512, listed
        assert str(listed[MODEL_A]["model_path"])  # (the running config's paths)
    finally:
        cfg.write_text(original)
