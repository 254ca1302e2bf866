"""Our processes refuse imports they never need (supervisor/lean.py); the libraries must still work then."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
from supervisor.lean import refuse_probed_imports
refuse_probed_imports(ssl={ssl})
import asyncio
import structlog
import zmq.asyncio
{extra}
assert sys.modules["greenlet"] is None
assert (sys.modules.get("ssl") is None) == {ssl}

async def main():
    {body}
asyncio.run(main())
print("ok")
"""

# ...nor OpenSSL: hashlib, hmac and secrets load it (~3.4 MB resident) and the supervisor needs none of them
SUPERVISOR = ("import supervisor.cli, supervisor.main, dashboard.auth, bus.endpoints\n"
              "assert 'aiohttp' not in sys.modules\n"
              "assert dashboard.auth.dashboard_token('127.0.0.1', None) is None\n"
              "assert bus.endpoints.worker('/tmp', 'a', 1) != bus.endpoints.worker('/tmp', 'b', 1)\n"
              "assert '_hashlib' not in sys.modules, 'OpenSSL loaded'",
              "structlog.get_logger().info('x'); await asyncio.sleep(0)")
DASHBOARD = ("import aiohttp.web, dashboard.app",
             "app = aiohttp.web.Application(); r = aiohttp.web.AppRunner(app); await r.setup(); "
             "s = aiohttp.web.TCPSite(r, '127.0.0.1', 0); await s.start(); await r.cleanup()")


def run(ssl: bool, extra: str, body: str) -> subprocess.CompletedProcess[str]:
    code = SCRIPT.format(ssl=ssl, extra=extra, body=body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_supervisor_runs_without_ssl_and_greenlet() -> None:
    out = run(True, *SUPERVISOR)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_an_aiohttp_server_runs_without_greenlet() -> None:
    out = run(False, *DASHBOARD)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_the_llama_runner_command_goes_through_the_lean_entry() -> None:
    # pyproject's console script must be the entry that refuses the imports (not supervisor.cli:main directly).
    import tomllib
    from pathlib import Path

    doc = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert doc["project"]["scripts"]["llama-runner"] == "supervisor.__main__:main"


AIOHTTP_WITHOUT_TLS = """
import asyncio, sys
from supervisor.lean import import_aiohttp_without_tls
import_aiohttp_without_tls()
import aiohttp, aiohttp.web
import ssl  # back for everyone else (uvloop needs it)
import aiohttp.connector
assert aiohttp.connector.ssl is None and ssl.SSLContext
# only aiohttp's own modules went without: the standard library keeps TLS (prometheus_client needs urllib's)
for name, mod in list(sys.modules.items()):
    if mod is not None and not name.startswith("aiohttp"):
        assert vars(mod).get("ssl", ssl) is not None and vars(mod).get("_have_ssl", True), name
import urllib.request, prometheus_client
assert urllib.request.HTTPSHandler

async def main():
    app = aiohttp.web.Application()
    app.router.add_get("/", lambda r: aiohttp.web.json_response({"ok": 1}))
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
        assert (await r.json()) == {"ok": 1}
    try:
        async with aiohttp.ClientSession() as s:
            await s.get("https://127.0.0.1:9/")
        raise SystemExit("https must fail without TLS")
    except RuntimeError as exc:  # aiohttp: "SSL is not supported." -- fails loudly, never insecurely
        assert "SSL" in str(exc)
    await runner.cleanup()
asyncio.run(main())
print("ok")
"""


def test_aiohttp_imported_without_tls_serves_and_calls_plain_http() -> None:
    out = subprocess.run([sys.executable, "-c", AIOHTTP_WITHOUT_TLS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
