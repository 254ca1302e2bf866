"""A worker's llama-server child (the real binary and the default model): it listens on a free TCP port and on a
unix socket in the run dir, where the worker speaks to it; a llama-server that cannot listen on unix sockets is
started again on TCP only."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus import endpoints
from bus.protocol import ModelParams, WorkerLaunch
from tests.conftest import require_runtime
from workers.backend_http import BackendPool
from workers.llama_server import LlamaServer


@pytest.fixture
def run_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lr-", dir="/tmp") as d:  # short: unix socket paths are limited
        yield Path(d)


def launch(run_dir: Path, llama_server: str | None = None, extra_args: list[str] | None = None) -> WorkerLaunch:
    from config import runtime
    from config.loader import load_config

    require_runtime()
    cfg = load_config()
    model = cfg.models.models[cfg.models.default_model or ""]
    binary = llama_server or str(runtime.find_llama_server(cfg.app.llama_server_path))
    return WorkerLaunch(name="smol", kind="llama", model_path=str(cfg.model_path(model)), run_dir=str(run_dir),
                        logs_dir=str(run_dir), supervisor_pid=os.getpid(), llama_server=binary,
                        params=ModelParams(ctx_size=512, threads=1, parallel=1, extra_args=extra_args or []))


async def health(pool: BackendPool) -> tuple[int, socket.AddressFamily]:
    """/health's status through ``pool``, and the address family of the connection it used."""
    status = [0]

    def on_head(code: int, _ct: str) -> bool:
        status[0] = code
        return True

    try:
        await pool.request("GET", "/health", b"", on_head, lambda _data: True)
        sock = pool.idle[-1].transport.get_extra_info("socket")  # type: ignore[union-attr]
        return status[0], sock.family
    finally:
        pool.close()


def test_the_worker_speaks_to_llama_server_over_a_unix_socket_its_port_stays_open(run_dir: Path) -> None:
    async def main() -> None:
        server = LlamaServer(launch(run_dir), run_dir / "llama-server.log")
        try:
            await server.start(60)
            assert server.socket_path == endpoints.llama_socket(run_dir, "smol")
            assert await asyncio.to_thread(Path(str(server.socket_path)).is_socket)
            assert await health(server.pool()) == (200, socket.AF_UNIX)
            assert await health(BackendPool("127.0.0.1", server.port)) == (200, socket.AF_INET)  # direct access
        finally:
            await server.stop()
        assert not await asyncio.to_thread(Path(str(server.socket_path)).exists)

    asyncio.run(main())


def test_a_llama_server_that_cannot_listen_on_unix_sockets_is_started_again_on_tcp_only(run_dir: Path) -> None:
    real = launch(run_dir).llama_server
    old = run_dir / "old-llama-server"  # as llama-server before unix sockets: "127.0.0.1,PATH" is no host to it
    old.write_text('#!/bin/sh\ncase "$4" in *,*) echo "E srv start: couldn\'t bind HTTP server socket, hostname: '
                   f'$4, port: 0"; exit 1;; esac\nexec "{real}" "$@"\n')
    old.chmod(0o755)

    async def main() -> None:
        server = LlamaServer(launch(run_dir, str(old)), run_dir / "llama-server.log")
        try:
            await server.start(60)
            assert server.socket_path is None and server.port
            assert await health(server.pool()) == (200, socket.AF_INET)
        finally:
            await server.stop()

    asyncio.run(main())


def test_a_llama_server_older_than_the_prompt_cache_flag_is_started_again_without_it(run_dir: Path) -> None:
    """--cache-ram (added by default since llama-server's own default let a worker grow to 1.5 GB) is newer than
    some llama-servers a user may point us at: they exit with "invalid argument"; the model must still load."""
    real = launch(run_dir).llama_server
    old = run_dir / "old-llama-server"
    old.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = --cache-ram ] && { echo "error: invalid argument: '
                   f'--cache-ram"; exit 1; }}; done\nexec "{real}" "$@"\n')
    old.chmod(0o755)

    async def main() -> None:
        server = LlamaServer(launch(run_dir, str(old), ["--cache-ram", "64"]), run_dir / "llama-server.log")
        try:
            await server.start(60)
            assert await health(server.pool()) == (200, socket.AF_UNIX)
        finally:
            await server.stop()

    asyncio.run(main())


def test_a_llama_server_that_fails_otherwise_is_not_started_again(run_dir: Path) -> None:
    bad = run_dir / "bad-llama-server"
    bad.write_text('#!/bin/sh\necho started >> "$(dirname "$0")/starts"\necho "error: no such model"\nexit 1\n')
    bad.chmod(0o755)

    async def main() -> None:
        from workers.llama_server import BackendError

        server = LlamaServer(launch(run_dir, str(bad)), run_dir / "llama-server.log")
        with pytest.raises(BackendError, match="no such model"):
            await server.start(30)
        assert (run_dir / "starts").read_text().count("started") == 1

    asyncio.run(main())


def test_a_host_of_the_models_own_extra_args_wins_the_worker_speaks_tcp(run_dir: Path) -> None:
    async def main() -> None:
        server = LlamaServer(launch(run_dir, extra_args=["--host", "127.0.0.1"]), run_dir / "llama-server.log")
        try:
            await server.start(60)
            assert server.socket_path is None
            assert await health(server.pool()) == (200, socket.AF_INET)
        finally:
            await server.stop()

    asyncio.run(main())


def test_the_flags_a_worker_may_drop_are_the_ones_the_config_adds() -> None:
    from config.schema import CACHE_RAM_FLAG
    from workers.llama_server import OPTIONAL_FLAGS

    assert CACHE_RAM_FLAG in OPTIONAL_FLAGS


def test_a_llama_server_stopped_while_it_loads_is_killed_at_once(run_dir: Path) -> None:
    """llama-server heeds SIGTERM only once it serves: a load given up on (its client gone) held the model in
    'stopping' for the whole 5 s grace. Here a wrapper deaf to SIGTERM for its first seconds stands for that."""
    real = launch(run_dir).llama_server
    slow = run_dir / "slow-llama-server"
    slow.write_text(f"#!{sys.executable}\nimport os, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    f"time.sleep(3)\nos.execv({real!r}, [{real!r}, *sys.argv[1:]])\n")  # (one process, as it)
    slow.chmod(0o755)

    async def main() -> None:
        import time

        server = LlamaServer(launch(run_dir, str(slow)), run_dir / "llama-server.log")
        starting = asyncio.create_task(server.start(60))
        while server.proc is None:  # noqa: ASYNC110 (a test: the process appears in start())
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await server.stop()
        took = time.monotonic() - t0
        assert server.proc.returncode is not None and took < 1.5, took
        with pytest.raises(Exception):  # noqa: B017 (its start fails: llama-server is gone)
            await starting

    asyncio.run(main())
