"""The dashboard's guard: beyond 127.0.0.1 actions need the token; cross-origin actions are always refused.

The app is built for host 0.0.0.0 but served by aiohttp's test server on 127.0.0.1 (nothing leaves loopback).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from bus.protocol import GatewayLaunch
from dashboard.app import build


def _launch(tmp_path: Path, host: str) -> GatewayLaunch:
    return GatewayLaunch(protocol="dashboard", host=host, port=0, run_dir=str(tmp_path), logs_dir=str(tmp_path),
                         supervisor_pid=0, config_dir=str(tmp_path / "no-config"))


async def test_actions_need_the_token_beyond_loopback(tmp_path: Path) -> None:
    async with TestClient(TestServer(build(_launch(tmp_path, "0.0.0.0"), token="s3cret"))) as client:
        info = await (await client.get("/api/info")).json()
        assert info["token_required"] is True and info["token_ok"] is False
        for url in ("/api/workers/smollm2/restart", "/api/reload", "/api/chat"):
            r = await client.post(url)
            assert r.status == 401, url
            assert "token" in (await r.json())["error"]
        r = await client.post("/api/workers/smollm2/stop", headers={"X-Llama-Runner-Token": "wrong"})
        assert r.status == 401
        r = await client.get("/api/logs/smollm2")
        assert r.status == 401
        r = await client.get("/api/info", headers={"Authorization": "Bearer s3cret"})
        assert (await r.json())["token_ok"] is True
        # read-only figures stay open to scrapers
        r = await client.get("/metrics")
        assert r.status == 200 and "llama_runner_" in await r.text()


async def test_cross_origin_actions_are_refused_even_on_loopback(tmp_path: Path) -> None:
    async with TestClient(TestServer(build(_launch(tmp_path, "127.0.0.1"), token=None))) as client:
        info = await (await client.get("/api/info")).json()
        assert info["token_required"] is False
        r = await client.post("/api/workers/smollm2/stop", headers={"Origin": "http://evil.example"})
        assert r.status == 403
        r = await client.post("/api/workers/smollm2/frobnicate",
                              headers={"Origin": f"http://{client.host}:{client.port}"})
        assert r.status == 404  # same origin passes the guard (and meets the unknown verb)


async def test_a_foreign_host_header_is_refused_on_loopback(tmp_path: Path) -> None:
    """DNS rebinding: a page of attacker.example resolving to 127.0.0.1 is "same origin" with itself: its actions
    (stop a model, discover, read logs) were let in on a loopback dashboard without a token."""
    async with TestClient(TestServer(build(_launch(tmp_path, "127.0.0.1")))) as client:
        evil = {"Host": "attacker.example:8585", "Origin": "http://attacker.example:8585"}
        for method, url in (("POST", "/api/workers/smollm2/stop"), ("GET", "/api/logs/supervisor"),
                            ("GET", "/api/info")):
            r = await client.request(method, url, headers=evil)
            assert r.status == 403 and "DNS rebinding" in (await r.json())["error"], url
        r = await client.get("/api/info", headers={"Host": "localhost:8585"})
        assert r.status == 200


async def test_a_chat_body_that_never_comes_is_a_408(tmp_path: Path, monkeypatch) -> None:
    """It held the connection for good (200 s and more)."""
    import asyncio

    from dashboard import app as dashboard_app

    monkeypatch.setattr(dashboard_app, "BODY_TIMEOUT_S", 0.5)
    server = TestServer(build(_launch(tmp_path, "127.0.0.1"), token=None))
    async with TestClient(server):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\":")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(200), 5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
