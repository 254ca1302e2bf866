"""API keys, CORS and bounded request reading (gateway/security.py, gateway/request_limits.py) on the real
gateway apps (ollama_app.build / openai_app.build) with a private config and no supervisor behind them."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bus.protocol import GatewayLaunch
from config.schema import LimitsConfig
from gateway import ollama_app, openai_app, request_limits
from gateway.errors import ApiError
from gateway.security import key_matches
from tests.conftest import ROOT

KEY = "sk-test-0123456789"


def _config(tmp_path: Path, **app: Any) -> Path:
    shutil.copy(ROOT / "config" / "models_config.json", tmp_path / "models_config.json")
    doc = json.loads((ROOT / "config" / "app_config.json").read_text())
    for key, value in app.items():
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (tmp_path / "app_config.json").write_text(json.dumps(doc))
    return tmp_path


Factory = Callable[..., Any]


def build_app(tmp_path: Path, protocol: str = "ollama", **app: Any) -> web.Application:
    """The real gateway app of ``protocol`` on a private config (``app``: key paths of app_config.json), no
    supervisor behind it."""
    cfg = _config(tmp_path, **app)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    launch = GatewayLaunch(protocol=protocol, host="127.0.0.1", port=0, run_dir=str(run), logs_dir=str(tmp_path),
                           supervisor_pid=0, config_dir=str(cfg), load_timeout_s=1.0)
    return (ollama_app.build if protocol == "ollama" else openai_app.build)(launch)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Factory]:
    clients: list[TestClient] = []

    async def make(protocol: str = "ollama", **app: Any) -> TestClient:
        client = TestClient(TestServer(build_app(tmp_path, protocol, **app)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


# --------------------------------------------------------------------------- API keys
async def test_ollama_port_needs_the_key_but_the_health_check_stays_open(gateway: Factory) -> None:
    c = await gateway("ollama", **{"proxies.ollama.api_keys": ["other-key", KEY]})
    r = await c.get("/api/version")
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    doc = await r.json()
    assert isinstance(doc["error"], str) and "missing API key" in doc["error"]
    r = await c.get("/api/version", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401 and "invalid API key" in (await r.json())["error"]
    r = await c.get("/api/version", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status == 200 and "version" in await r.json()
    r = await c.get("/api/version", headers={"Authorization": "bearer other-key"})
    assert r.status == 200
    for method in ("GET", "HEAD"):
        r = await c.request(method, "/")
        assert r.status == 200
    r = await c.post("/", data=b"{}")  # only the health check is open, not other methods on it
    assert r.status == 401
    r = await c.get("/no/such/path")  # unknown paths do not tell what exists
    assert r.status == 401


async def test_v1_on_the_ollama_port_answers_401_in_openai_shape(gateway: Factory) -> None:
    c = await gateway("ollama", **{"proxies.ollama.api_keys": [KEY]})
    r = await c.post("/v1/chat/completions", json={"model": "m", "messages": []})
    doc = await r.json()
    assert r.status == 401 and doc["error"]["code"] == "invalid_api_key"
    assert doc["error"]["type"] == "invalid_request_error" and set(doc["error"]) == {"message", "type", "param", "code"}


async def test_openai_port_uses_the_lmstudio_keys(gateway: Factory) -> None:
    c = await gateway("openai", **{"proxies.lmstudio.api_keys": [KEY], "proxies.ollama.api_keys": ["x"]})
    for path in ("/v1/models", "/api/v0/models"):
        r = await c.get(path)
        assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
    r = await c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status == 200
    r = await c.get("/v1/models", headers={"Authorization": "Bearer x"})
    assert r.status == 401


async def test_no_keys_configured_means_no_authentication(gateway: Factory) -> None:
    c = await gateway("openai")
    assert (await c.get("/v1/models")).status == 200


def test_key_matching() -> None:
    assert key_matches("a", ["b", "a"]) and not key_matches("a", ["b"]) and not key_matches("", [""])
    assert not key_matches("\udcff", ["x"])  # undecodable header bytes never raise


# --------------------------------------------------------------------------- CORS
async def test_cors_is_off_by_default(gateway: Factory) -> None:
    c = await gateway("ollama")
    r = await c.get("/api/version", headers={"Origin": "http://evil.example"})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    r = await c.options("/api/chat", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in r.headers and r.status == 403  # (it was routed: a 405)
    assert "cors_origins" in (await r.json())["error"]


async def test_cors_allows_listed_origins_and_answers_preflight_before_auth(gateway: Factory) -> None:
    app = "http://app.example:3000"
    c = await gateway("ollama", **{"proxies.ollama.cors_origins": [app], "proxies.ollama.api_keys": [KEY]})
    r = await c.options("/api/chat", headers={"Origin": app, "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == app
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert r.headers["Vary"] == "Origin"
    r = await c.get("/api/version", headers={"Origin": app, "Authorization": f"Bearer {KEY}"})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == app
    r = await c.get("/api/version", headers={"Origin": app})  # errors carry it too: the page can read them
    assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == app
    r = await c.get("/api/version", headers={"Origin": "http://other.example", "Authorization": f"Bearer {KEY}"})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    r = await c.options("/api/chat", headers={"Origin": "http://other.example",
                                              "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in r.headers and r.status == 403


async def test_cors_star_allows_any_origin(gateway: Factory) -> None:
    c = await gateway("openai", **{"proxies.lmstudio.cors_origins": ["*"]})
    r = await c.get("/v1/models", headers={"Origin": "http://x.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = await c.options("/v1/chat/completions", headers={"Origin": "http://x.example",
                                                         "Access-Control-Request-Method": "POST"})
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_origin_patterns_as_ollamas(gateway: Factory) -> None:
    """OLLAMA_ORIGINS-style patterns ("http://localhost:*", "chrome-extension://*") matched nothing: only exact
    origins and "*" did."""
    c = await gateway("ollama", **{"proxies.ollama.cors_origins": ["http://localhost:*", "chrome-extension://*"]})
    for origin, allowed in (("http://localhost:3000", True), ("chrome-extension://abcdef", True),
                            ("http://localhost.evil.example", False), ("https://localhost:3000", False),
                            ("http://evil.example", False)):
        r = await c.options("/api/chat", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert (r.status == 204 and r.headers["Access-Control-Allow-Origin"] == origin) if allowed else \
            (r.status == 403 and "Access-Control-Allow-Origin" not in r.headers), (origin, r.status)


# --------------------------------------------------------------------------- limits
async def test_body_over_max_body_bytes_is_413_in_each_shape(gateway: Factory) -> None:
    c = await gateway("ollama", **{"limits.max_body_bytes": 1000})
    big = json.dumps({"model": "m", "prompt": "x" * 2000}).encode()
    r = await c.post("/api/generate", data=big)
    doc = await r.json()
    assert r.status == 413 and "limits.max_body_bytes" in doc["error"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: refused while reading
        for _ in range(10):
            yield b" " * 500

    r = await c.post("/v1/chat/completions", data=chunked())
    doc = await r.json()
    assert r.status == 413 and doc["error"]["code"] == "request_too_large"


async def test_too_many_messages_and_too_long_prompts_are_413(gateway: Factory) -> None:
    c = await gateway("openai", **{"limits.max_messages": 3, "limits.max_prompt_chars": 100})
    msgs = [{"role": "user", "content": "hi"}] * 4
    r = await c.post("/v1/chat/completions", json={"model": "m", "messages": msgs})
    doc = await r.json()
    assert r.status == 413 and doc["error"]["code"] == "too_many_messages" and doc["error"]["param"] == "messages"
    r = await c.post("/v1/completions", json={"model": "m", "prompt": "y" * 101})
    doc = await r.json()
    assert r.status == 413 and doc["error"]["code"] == "prompt_too_long" and doc["error"]["param"] == "prompt"


async def test_a_slow_body_is_refused_after_read_timeout(gateway: Factory) -> None:
    c = await gateway("ollama", **{"limits.read_timeout_s": 0.3})

    async def slow() -> AsyncIterator[bytes]:
        yield b'{"model": "m", '
        await asyncio.sleep(3)
        yield b'"prompt": "x"}'

    r = await asyncio.wait_for(c.post("/api/generate", data=slow()), 2.5)
    doc = await r.json()
    assert r.status == 408 and "limits.read_timeout_s" in doc["error"]


def test_prompt_chars_counts_every_text_field() -> None:
    req = {"messages": [{"role": "user", "content": "abc"},
                        {"role": "user", "content": [{"type": "text", "text": "de"}, {"type": "image_url"}]},
                        "junk", {"content": 5}],
           "prompt": "f", "system": "gh", "suffix": "i", "input": ["jk", [1, 2], "l"]}
    assert request_limits.prompt_chars(req) == 12
    request_limits.check(req, LimitsConfig(max_prompt_chars=12, max_messages=4))
    with pytest.raises(ApiError) as err:
        request_limits.check(req, LimitsConfig(max_prompt_chars=11))
    assert err.value.status == 413


# --------------------------------------------------------------------------- regressions found by the fuzz
async def test_invalid_utf8_in_a_json_string_is_a_400_not_a_crash(gateway: Factory) -> None:
    c = await gateway("ollama")
    r = await c.post("/api/chat", data=b'{"model": "\xff\xfe", "messages": []}')
    doc = await r.json()
    assert r.status == 400 and "invalid UTF-8" in doc["error"]
    r = await c.post("/v1/embeddings", data=b'{"input": "\xc3"}')
    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"


async def test_deeply_nested_json_is_a_400_not_a_crash(gateway: Factory) -> None:
    c = await gateway("openai")
    depth = 5000
    r = await c.post("/v1/chat/completions", data=b'{"messages": ' + b"[" * depth + b"]" * depth + b"}")
    doc = await r.json()
    assert r.status == 400 and "nested too deeply" in doc["error"]["message"]


async def test_a_body_not_in_its_content_encoding_is_a_400(gateway: Factory) -> None:
    for port, path in (("openai", "/v1/chat/completions"), ("ollama", "/api/chat")):
        c = await gateway(port)
        r = await c.post(path, data=b"{}", headers={"Content-Encoding": "gzip"})  # (a 500, a traceback logged)
        assert r.status == 400 and "cannot be read" in (await r.text()), await r.text()


async def test_utf8_errors_say_where_and_lone_surrogates_read_as_replacement_characters(gateway: Factory) -> None:
    c = await gateway("ollama")
    r = await c.post("/api/chat", data=b'{"model": "m", "messages": [], "x": "ab\xff"}')
    assert r.status == 400 and "at byte 39" in (await r.json())["error"]  # (said byte 2: in the string)
    # what Python's json.dumps writes for a string with half a surrogate pair: Ollama (Go) reads U+FFFD; it was a 400
    r = await c.post("/api/show", data=b'{"model": "nope\\ud800"}')
    assert r.status == 404 and "nope\ufffd" in (await r.json())["error"], await r.text()
    r = await c.post("/api/show", data=b'{"model": "x\\u0041", "verbose": NaN}')  # (still not JSON)
    assert r.status == 400 and "invalid JSON" in (await r.json())["error"]


async def test_a_foreign_host_header_is_refused_on_loopback(gateway: Factory) -> None:
    """DNS rebinding: a web page of another site, its name made to resolve to 127.0.0.1, reaches a loopback port
    with its own name in Host (a browser sends it so): refused, as Ollama refuses it; this machine's names pass."""
    for protocol, path, shape in (("ollama", "/api/tags", "error"), ("openai", "/v1/models", "error")):
        c = await gateway(protocol)
        r = await c.get(path, headers={"Host": "attacker.example:1234"})
        doc = await r.json()
        assert r.status == 403 and "DNS rebinding" in (doc[shape] if protocol == "ollama" else doc[shape]["message"])
        for host in ("localhost:11434", "127.0.0.1", "[::1]:1234", "box.local", "host.docker.internal",
                     "192.168.1.20:1234", "app.localhost"):
            r = await c.get(path, headers={"Host": host})
            assert r.status == 200, host


def test_local_host_names() -> None:
    from gateway.security import local_host_header

    assert local_host_header("LOCALHOST:80") and local_host_header("10.0.0.1") and local_host_header("")
    for host in ("attacker.example", "127.0.0.1.attacker.example", "localhost.attacker.example:80", "8.8.8.8",
                 "[2606:4700::1111]:80"):
        assert not local_host_header(host), host
