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

SUPERVISOR = ("import supervisor.cli, supervisor.main, dashboard.auth; assert 'aiohttp' not in sys.modules",
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
