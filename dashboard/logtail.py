"""Live tail of a worker's log files over SSE (the worker's own log and its llama-server's output).

Names never become paths unchecked: the caller passes only a name the supervisor's Status reply listed, and
the path is built from a fixed pattern inside the logs directory and checked to stay there.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

from aiohttp import web

TAIL_BYTES = 16 * 1024
POLL_S = 0.25  # file follow interval (a local file read, not a network poll)
MAX_READ = 256 * 1024
KINDS = {"llama-server": "worker-{name}.llama-server.log", "worker": "worker-{name}.log",
         "stderr": "worker-{name}.out"}


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$")  # config/schema.py's ModelName


def log_paths(logs_dir: Path, name: str) -> dict[str, Path]:
    if not _NAME.match(name) or len(name) > 128:
        raise ValueError(f"bad model name {name!r}")
    root = logs_dir.resolve()
    out = {}
    for kind, pattern in KINDS.items():
        path = (root / pattern.format(name=name)).resolve()
        if path.parent != root:  # a name with a separator would leave the folder: refuse
            raise ValueError(f"bad model name {name!r}")
        out[kind] = path
    return out


class _Follower:
    def __init__(self, kind: str, path: Path) -> None:
        self.kind, self.path = kind, path
        self.pos = -1
        self.ino = 0
        self.partial = b""

    def read(self) -> list[str]:
        """New complete lines since the last call (starts with the last TAIL_BYTES of the file)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        if self.pos < 0 or st.st_ino != self.ino or st.st_size < self.pos:  # first time, rotated, truncated
            self.pos = max(0, st.st_size - TAIL_BYTES) if self.pos < 0 else 0
            self.ino = st.st_ino
            self.partial = b""
            skip_first = self.pos > 0
        else:
            skip_first = False
        if st.st_size == self.pos:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read(MAX_READ)
        self.pos += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if skip_first and lines:
            lines = lines[1:]  # started mid-line
        return [ln.decode("utf-8", "replace").rstrip("\r") for ln in lines]


async def tail(request: web.Request, logs_dir: Path, name: str) -> web.StreamResponse:
    try:
        paths = log_paths(logs_dir, name)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    followers = [_Follower(kind, path) for kind, path in paths.items()]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    await resp.write(b": tail of " + name.encode() + b"\n\n")
    idle = 0.0
    try:
        while True:
            out = []
            for f in followers:
                for line in f.read():
                    out.append(b"data: " + json.dumps({"source": f.kind, "line": line}).encode() + b"\n\n")
            if out:
                await resp.write(b"".join(out))
                idle = 0.0
            else:
                idle += POLL_S
                if idle >= 15:
                    await resp.write(b": keepalive\n\n")
                    idle = 0.0
            await asyncio.sleep(POLL_S)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return resp
