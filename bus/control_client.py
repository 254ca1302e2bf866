"""Async client of the supervisor's control socket: send a Command, await its correlated Reply."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.asyncio

from bus import endpoints
from bus.codec import COMMANDS, REPLIES, BusDecodeError
from bus.protocol import Command, ErrorReply, Reply

log = structlog.get_logger()


_ID_PREFIX = os.urandom(8).hex()  # this process's: ids of different processes never meet
_ID_COUNTER = itertools.count(1)


def new_id() -> str:
    """A request id unique on this bus (a per-process random prefix and a counter; uuid4 cost a getrandom
    syscall and an object per request)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


class ControlTimeout(Exception):
    pass


class ControlClient:
    def __init__(self, run_dir: Path | str, ctx: zmq.asyncio.Context | None = None) -> None:
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoints.control(run_dir))
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def request(self, cmd: Command, timeout: float) -> Reply:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        rid = cmd.request_id
        self._pending[rid] = fut
        try:
            await self.sock.send(COMMANDS.encode(cmd))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ControlTimeout(f"no answer from the supervisor within {timeout:.0f}s") from None
        finally:
            self._pending.pop(rid, None)

    def fail_pending(self, status: int, code: str, message: str) -> None:
        """Answer every request still waiting for the supervisor with this error (a shutdown: a supervisor killed
        with -9 answers nothing, and a request waiting for a model to load had no answer at all)."""
        for rid, fut in list(self._pending.items()):
            if not fut.done():
                fut.set_result(ErrorReply(request_id=rid, code=code, message=message, status=status))

    def notify(self, cmd: Command) -> None:
        """Send without waiting for the reply (it is dropped): releases, cancels."""
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send(COMMANDS.encode(cmd), zmq.NOBLOCK)

    async def _read(self) -> None:
        while True:
            payload = await self.sock.recv()
            try:
                reply = REPLIES.decode(payload)
            except BusDecodeError as exc:
                log.warning("bad_reply", error=str(exc))
                continue
            fut = self._pending.get(reply.request_id)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()


def reply_fields(reply: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.to_builtins(reply)
