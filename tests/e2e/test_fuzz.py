"""Hostile input against the real system: a hypothesis fuzz of every HTTP route of both gateways and the
dashboard, slow clients, and what must hold afterwards.

Routes are enumerated from the apps themselves (``app.router.routes()``), so a new route is fuzzed without
touching this file. Every answer must be a 2xx (where the request happened to be valid) or a 4xx/5xx in the
protocol's shape; a 500 may only come from the backend (llama-runner's own "internal error" is a bug). After
the fuzz no gateway or worker has restarted, no worker lease is left, and a 1-slot model answers at once.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.protocol import GatewayLaunch
from tests.conftest import (
    ROOT,
    System,
    require_runtime,
    running_system,
    wait_for,
)

pytestmark = pytest.mark.e2e
MODEL = "smollm2"  # one slot in this config
READ_TIMEOUT_S = 3.0
EXAMPLES = 15  # per route: ~50 routes, about a minute on 2 cores


def fuzz_config() -> Path:
    cfg = Path(tempfile.mkdtemp(prefix="lr-cfg-fuzz-"))
    app = json.loads((ROOT / "config" / "app_config.json").read_text())
    app["limits"].update(read_timeout_s=READ_TIMEOUT_S, max_body_bytes=256 * 1024, max_upload_bytes=256 * 1024,
                         request_timeout_s=60)
    models = json.loads((ROOT / "config" / "models_config.json").read_text())
    for name in (MODEL, "smollm2-embed"):  # short answers (-n caps every request's n_predict), one slot
        p = models["models"][name]["parameters"]
        models["models"][name]["parameters"] = {**p, "parallel": 1, "ctx_size": 512, "extra_args": ["-n", "8"]}
    (cfg / "app_config.json").write_text(json.dumps(app))
    (cfg / "models_config.json").write_text(json.dumps(models))
    return cfg


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[System]:
    require_runtime()
    with running_system(fuzz_config(), remove_config_dir=True) as sysm:
        yield sysm


# --------------------------------------------------------------------------- routes, from the apps
def _routes() -> list[tuple[str, str, str]]:
    """(app, method, path template) of every route of the three apps, built offline on a dummy run dir."""
    from dashboard import app as dashboard_app
    from gateway import ollama_app, openai_app

    run = tempfile.mkdtemp(prefix="lr-routes-")
    out: list[tuple[str, str, str]] = []
    try:
        for kind, build in (("ollama", ollama_app.build), ("openai", openai_app.build),
                            ("dashboard", dashboard_app.build)):
            launch = GatewayLaunch(protocol=kind, host="127.0.0.1", port=0, run_dir=run, logs_dir=run,
                                   supervisor_pid=0, config_dir=str(ROOT / "config"))
            app = build(launch)
            for route in app.router.routes():
                if route.method != "HEAD":  # aiohttp adds HEAD for every GET; random methods cover it
                    out.append((kind, route.method, route.resource.canonical if route.resource else "/"))
            for value in app.values():  # the zmq contexts of the unstarted bus / control clients
                ctx = getattr(value, "ctx", None) or getattr(getattr(value, "control", None), "ctx", None)
                if ctx is not None:
                    ctx.destroy(0)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return sorted(set(out))


ROUTES = _routes()


def test_every_app_has_its_routes_enumerated() -> None:
    paths = {(k, p) for k, _, p in ROUTES}
    assert {("ollama", "/api/chat"), ("ollama", "/v1/audio/transcriptions"), ("openai", "/api/v0/models/{model}"),
            ("dashboard", "/api/workers/{name}/{verb}")} <= paths


# --------------------------------------------------------------------------- strategies
MODELS = st.sampled_from([MODEL, "smollm2-embed", "whisper-1", "smollm2:latest", "", "no-such-model",
                          "../../../etc/passwd", "/etc/passwd", "..", "C:\\Windows\\win.ini", "a" * 300,
                          "smollm2\x00", "%2e%2e%2f"])
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                   st.floats(allow_nan=False), st.text(max_size=40), st.just("x" * 100_000), MODELS)
JSON = st.recursive(LEAVES, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                   st.dictionaries(st.text(max_size=10), kids, max_size=4)),
                    max_leaves=12)
FIELDS = ["model", "name", "messages", "prompt", "system", "suffix", "input", "stream", "options", "keep_alive",
          "format", "tools", "max_tokens", "max_completion_tokens", "temperature", "n", "stop", "response_format",
          "stream_options", "logprobs", "images", "truncate", "dimensions", "encoding_format", "raw", "template",
          "think", "verbose", "ttl", "num_predict", "seed", "top_k", "tool_choice", "content", "role", "context"]
MESSAGE = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                              "content": JSON, "images": JSON, "tool_calls": JSON})
OPTIONS = st.dictionaries(st.sampled_from(["num_predict", "temperature", "num_ctx", "stop", "seed", "top_k",
                                           "top_p", "mirostat", "x"]), LEAVES, max_size=4)


@st.composite
def request_doc(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = draw(st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6))
    if draw(st.booleans()):
        doc["model"] = draw(MODELS)
    if draw(st.booleans()):
        doc["messages"] = draw(st.lists(MESSAGE, max_size=3) | JSON)
    if draw(st.booleans()):
        doc["options"] = draw(OPTIONS)
    return doc


def _multipart(draw: st.DrawFn) -> tuple[bytes, str]:
    boundary = draw(st.sampled_from(["b0undary", "", "x" * 80, "a b"]))
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["file", "model", "response_format", "language", "temperature", "stream",
                                     "timestamp_granularities[]", "prompt", "", "x"]))
        value = draw(st.binary(max_size=200) | MODELS.map(str.encode))
        filename = '; filename="a.wav"' if name == "file" else ""
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode()
                     + value + b"\r\n")
    tail = draw(st.sampled_from([f"--{boundary}--\r\n".encode(), b"", b"--garbage"]))
    return b"".join(parts) + tail, f"multipart/form-data; boundary={boundary}"


@st.composite
def body(draw: st.DrawFn) -> tuple[bytes, str]:
    """(body, content type): JSON objects, any JSON, invalid UTF-8, random bytes, deep nesting, multipart."""
    kind = draw(st.sampled_from(["doc", "doc", "doc", "json", "utf8", "bytes", "deep", "multipart", "empty"]))
    if kind == "doc":
        return json.dumps(draw(request_doc())).encode(), "application/json"
    if kind == "json":
        return json.dumps(draw(JSON)).encode(), "application/json"
    if kind == "utf8":
        return b'{"model": "' + draw(st.binary(min_size=1, max_size=20)) + b'\xff\xfe", "prompt": "\xc3"}', \
            "application/json"
    if kind == "bytes":
        return draw(st.binary(max_size=300)), draw(st.sampled_from(["application/json", "text/plain", ""]))
    if kind == "deep":
        depth = draw(st.integers(100, 5000))
        return b'{"model": "smollm2", "messages": ' + b"[" * depth + b"]" * depth + b"}", "application/json"
    if kind == "multipart":
        return _multipart(draw)
    return b"", "application/json"


def path_value() -> st.SearchStrategy[str]:
    return st.one_of(MODELS, st.text(min_size=1, max_size=20)).map(lambda s: quote(s, safe="") or "x")


def fill(template: str, values: list[str]) -> str:
    it = iter(values)
    return re.sub(r"\{[^}]+\}", lambda _: next(it, "x"), template)


# --------------------------------------------------------------------------- checks
def is_openai_shape(doc: Any) -> bool:
    err = doc.get("error") if isinstance(doc, dict) else None
    return (isinstance(err, dict) and set(err) >= {"message", "type", "param", "code"}
            and isinstance(err["message"], str) and isinstance(err["type"], str))


def is_ollama_shape(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("error"), str)


def check_answer(app: str, method: str, path: str, r: httpx.Response, content: bytes) -> None:
    where = f"{method} {path} -> {r.status_code}: {content[:300]!r}"
    assert 200 <= r.status_code < 600 and not 300 <= r.status_code < 400, where
    if app == "dashboard":  # no protocol shape of its own; it must not fail internally
        assert r.status_code != 500 or b"config error" in content, where
        return
    if r.status_code < 400 or method == "HEAD":
        return
    doc = json.loads(content)
    if app == "openai" or path.startswith("/v1/"):
        assert is_openai_shape(doc), where
        message = doc["error"]["message"]
    else:
        assert is_ollama_shape(doc), where
        message = doc["error"]
    assert "internal error in llama-runner" not in message, where
    if r.status_code == 500:
        assert message.endswith("(backend)"), where


def port_of(system: System, app: str) -> int:
    return {"ollama": system.ollama_port, "openai": system.openai_port, "dashboard": system.dashboard_port}[app]


METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("app", "method", "template"), ROUTES, ids=[f"{a}:{m}:{p}" for a, m, p in ROUTES])
def test_fuzz_route(fuzzed: System, app: str, method: str, template: str) -> None:
    base = f"http://127.0.0.1:{port_of(fuzzed, app)}"
    n_vars = template.count("{")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        m = method if method != "*" else data.draw(METHODS)
        if data.draw(st.integers(0, 5)) == 0:
            m = data.draw(METHODS)
        values = [data.draw(path_value()) for _ in range(n_vars)]
        if app == "dashboard":  # never a real model's name: the fuzz must not stop or restart workers
            values = [v if v not in (MODEL, "smollm2-embed", "whisper-1") else "x" for v in values]
        path = fill(template, values)
        content, ctype = data.draw(body())
        headers = {"Content-Type": ctype} if ctype else {}
        if data.draw(st.booleans()):
            headers["Origin"] = "http://evil.example"
        with httpx.Client(timeout=90) as client, client.stream(m, base + path, content=content,
                                                               headers=headers) as r:
            if r.headers.get("content-type", "").startswith("text/event-stream") and app == "dashboard":
                got = b""  # the dashboard's live streams never end
            else:
                got = r.read()
        check_answer(app, m, path, r, got)
        assert "Access-Control-Allow-Origin" not in r.headers  # CORS is off unless configured

    run()
    assert fuzzed.proc.poll() is None, "the supervisor exited"


# --------------------------------------------------------------------------- slow clients
def _raw_request(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head)
    return s


def test_slow_body_holds_no_worker_slot_and_is_refused_after_the_read_timeout(fuzzed: System) -> None:
    def generate() -> httpx.Response:
        return httpx.post(fuzzed.ollama_url + "/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False},
                          timeout=60)

    assert generate().status_code == 200  # loaded: the next answer takes well under READ_TIMEOUT_S
    body_ = json.dumps({"model": MODEL, "prompt": "Hi", "stream": False}).encode()
    slow = _raw_request(fuzzed.ollama_port, b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                        b"application/json\r\nContent-Length: " + str(len(body_)).encode() + b"\r\n\r\n" + body_[:10])
    try:
        t0 = time.monotonic()
        r = generate()  # the model has one slot: it must not be held by the slow client
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < READ_TIMEOUT_S, "the request waited for the slow client"
        # the gateway's shared lease outlives the request briefly (SHARED_LINGER_S); the slow client holds none
        wait_for(lambda: all(w["leases"] == 0 for w in fuzzed.status()["workers"]), 5, "no lease held")
        answer = slow.recv(65536)  # the server gives up on the slow body after READ_TIMEOUT_S
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - t0 >= READ_TIMEOUT_S - 1
        doc = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert "limits.read_timeout_s" in doc["error"]
    finally:
        slow.close()


# --------------------------------------------------------------------------- after the fuzz (runs last)
def test_zz_after_the_fuzz_nothing_restarted_and_no_slot_leaked(fuzzed: System) -> None:
    assert fuzzed.proc.poll() is None, "the supervisor exited"
    status = fuzzed.status()
    restarted = [p for p in status["processes"] if p["restarts"]]
    assert not restarted, restarted
    crashed = [w for w in status["workers"] if w["restarts"] or w["state"] in ("backoff", "fatal")]
    assert not crashed, crashed

    def no_leases() -> bool:
        return all(w["leases"] == 0 for w in fuzzed.status()["workers"])

    wait_for(no_leases, 15, "every worker lease released")
    t0 = time.monotonic()
    r = httpx.post(fuzzed.ollama_url + "/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False},
                   timeout=60)
    assert r.status_code == 200 and r.json()["done"] is True, r.text
    assert time.monotonic() - t0 < 20, "the 1-slot model did not answer promptly"
    wait_for(no_leases, 10, "the lease of the last request released")
    assert fuzzed.proc.poll() is None
