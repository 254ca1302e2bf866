"""API keys and CORS on the real system with the real clients: the openai client's ``api_key``, the ollama
client's ``headers``; a wrong key is refused in each protocol's shape, and no key ever reaches a log."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.conftest import (
    ROOT,
    System,
    require_runtime,
    running_system,
)

pytestmark = pytest.mark.e2e
OLLAMA_KEY = "ollama-key-5f1c2a9e"
LMSTUDIO_KEY = "lmstudio-key-77b0d3e4"
WRONG_KEY = "wrong-key-0c9d8e7f"
ORIGIN = "http://localhost:5173"


@pytest.fixture(scope="module")
def locked() -> Iterator[System]:
    require_runtime()
    cfg = Path(tempfile.mkdtemp(prefix="lr-cfg-sec-"))
    app = json.loads((ROOT / "config" / "app_config.json").read_text())
    app["proxies"]["ollama"].update(api_keys=[OLLAMA_KEY], cors_origins=[ORIGIN])
    app["proxies"]["lmstudio"].update(api_keys=[LMSTUDIO_KEY])
    (cfg / "app_config.json").write_text(json.dumps(app))
    shutil.copy(ROOT / "config" / "models_config.json", cfg / "models_config.json")
    with running_system(cfg, remove_config_dir=True) as sysm:
        yield sysm


def test_openai_client_with_the_key_is_served_and_a_wrong_key_is_refused(locked: System) -> None:
    ok = openai.OpenAI(base_url=locked.openai_url, api_key=LMSTUDIO_KEY, max_retries=0)
    assert "smollm2" in [m.id for m in ok.models.list()]
    r = ok.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert r.choices[0].message.content is not None
    for key in (WRONG_KEY, OLLAMA_KEY):  # the other port's key is not this port's
        bad = openai.OpenAI(base_url=locked.openai_url, api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


def test_up_says_the_dashboard_is_open_to_local_users_when_the_ports_want_keys(locked: System) -> None:
    said = (locked.run_dir / "up.err").read_text()
    assert "dashboard's actions" in said and "dashboard.token" in said, said


def test_ollama_client_sends_the_key_as_a_header(locked: System) -> None:
    ok = ollama.Client(host=locked.ollama_url, headers={"Authorization": f"Bearer {OLLAMA_KEY}"})
    assert any((m.model or "").startswith("smollm2") for m in ok.list().models)
    assert ok.generate(model="smollm2", prompt="Hi", options={"num_predict": 3}).done
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=locked.ollama_url).list()
    assert err.value.status_code == 401 and "missing API key" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=locked.ollama_url, headers={"Authorization": f"Bearer {WRONG_KEY}"}).list()
    assert err.value.status_code == 401 and "invalid API key" in err.value.error
    assert httpx.get(locked.ollama_url + "/").text == "Ollama is running"  # health check: open
    assert httpx.head(locked.ollama_url + "/").status_code == 200


def test_cors_for_the_configured_origin_only(locked: System) -> None:
    pre = httpx.options(locked.ollama_url + "/api/chat", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(locked.ollama_url + "/api/version", headers={"Origin": ORIGIN,
                                                               "Authorization": f"Bearer {OLLAMA_KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(locked.openai_url + "/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {LMSTUDIO_KEY}"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # not configured on this port


SECRET_PROMPT = "my-secret-prompt-6f2a"


def test_no_key_reaches_a_log(locked: System) -> None:
    httpx.get(locked.ollama_url + "/api/tags", headers={"Authorization": f"Bearer {WRONG_KEY}"})
    # a request aiohttp cannot parse (bare LF line ends; the fast front hands it over): its error, logged by
    # aiohttp with the request's bytes in the exception, carried the key and the prompt into the log
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(locked.ollama_url)
    body = b'{"model": "smollm2", "prompt": "' + SECRET_PROMPT.encode() + b'"}'
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\nHost: localhost\nAuthorization: Bearer " + OLLAMA_KEY.encode()
                     + b"\nContent-Length: " + str(len(body)).encode() + b"\n\n" + body)
        assert b" 400 " in sock.recv(4096).split(b"\r\n")[0]
    time.sleep(0.5)
    text = "".join(f.read_text(errors="replace") for f in locked.logs_dir.glob("*") if f.is_file())
    text += (locked.run_dir / "up.err").read_text(errors="replace")
    for key in (OLLAMA_KEY, LMSTUDIO_KEY, WRONG_KEY, SECRET_PROMPT):
        assert key not in text


def test_a_foreign_host_header_is_refused_on_every_path(locked: System) -> None:
    """DNS rebinding (see tests/gateway/test_security.py), on the fast front of the hot routes too."""
    evil = {"Host": "attacker.example", "Authorization": f"Bearer {OLLAMA_KEY}"}
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    r = httpx.post(locked.ollama_url + "/api/chat", json=body, headers=evil)
    assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]
    r = httpx.get(f"http://127.0.0.1:{locked.dashboard_port}/api/status", headers={"Host": "attacker.example"})
    assert r.status_code == 403


def test_the_dashboards_chat_needs_the_key_the_openai_port_wants(locked: System) -> None:
    """It sent the first configured key itself: any local process used every model through the dashboard."""
    url = f"http://127.0.0.1:{locked.dashboard_port}/api/chat"
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == 401, r.text
    r = httpx.post(url, json=body, timeout=60, headers={"Authorization": f"Bearer {LMSTUDIO_KEY}"})
    assert r.status_code == 200 and "data:" in r.text, r.text


def test_llama_servers_own_port_wants_the_workers_key(locked: System) -> None:
    """Its TCP port answered anybody: the gateways' api_keys and Host check were walked around through it."""
    import psutil

    ok = openai.OpenAI(base_url=locked.openai_url, api_key=LMSTUDIO_KEY, max_retries=0)
    ok.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    backend = psutil.Process(next(w for w in locked.status()["workers"] if w["name"] == "smollm2")["backend_pid"])
    (port,) = {c.laddr.port for c in backend.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 401, r.text
    assert "--api-key" not in " ".join(backend.cmdline()).replace("--api-key-file", "")  # (no key in argv)
