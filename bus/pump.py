"""The hot path's socket I/O: reading a zmq socket from the event loop's reader callback, and stream items
sent once per loop tick per gateway.

Measured on these machines (2 vCPUs): awaiting ``zmq.asyncio`` sends and receives cost a future, a loop
callback and several ``poll``/``epoll_ctl`` calls per message, about a quarter of a worker's CPU per request.
Here a socket is read with plain non-blocking calls when its file descriptor wakes the loop, and stream items
are collected during one loop tick and sent as one frame per gateway (``STREAM`` decodes a frame to a list):
a non-streaming answer (head, body, end) crosses the bus as one message, and a fast stream as one message per
tick carrying every request's new data.

zmq's file descriptor is edge-triggered: it signals "something changed", not "readable". A reader drains until
``EAGAIN``, and a send on the same socket may swallow the signal of an arriving message, so ``Reader.kick``
is called after sending on a socket that is also read.
"""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from collections.abc import Callable

import structlog
import zmq

from bus.codec import STREAM
from bus.protocol import StreamItem

log = structlog.get_logger()

# plain ints: pyzmq's flag enums cost a Python-level __and__/__call__ per use (measured ~15% of a drain)
EVENTS, POLLIN, NOBLOCK, SNDMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK), int(zmq.SNDMORE)
# pyzmq's compiled send/recv, without its Python layer (send_multipart/recv_multipart build flag enums and ask
# RCVMORE per frame): ~6 us less per message sent and received, measured.
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get


def send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """Send ``frames`` (copied) as one message without blocking: zmq.Again when the queue is full (then nothing
    was sent: zmq takes the frames of a message all or none)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _send(sock, frame, NOBLOCK | SNDMORE if i < last else NOBLOCK, True, False)


def recv_frames(sock: zmq.Socket) -> list[zmq.Frame]:
    """The next message's frames, without blocking (zmq.Again when there is none)."""
    frame = _recv(sock, NOBLOCK, False)
    frames = [frame]
    while frame.more:
        frame = _recv(sock, NOBLOCK, False)
        frames.append(frame)
    return frames


def readable(sock: zmq.Socket) -> bool:
    """Is a message waiting on ``sock``?"""
    return bool(_get(sock, EVENTS) & POLLIN)  # type: ignore[operator]  # (an int for EVENTS)

DRAIN_CAP = 512  # messages per reader callback before the loop gets a turn
RETRY_S = 0.002  # a gateway's queue is full (HWM): try again this much later
LINGER_S = 0.001  # more data of a flowing stream waits at most this long for company (see Outbox.put)


def sync_view(sock: zmq.Socket) -> zmq.Socket:
    """A plain (blocking-API) view of ``sock``, which may be a ``zmq.asyncio`` socket."""
    return zmq.Socket.shadow(sock.underlying)


class Reader:
    """Calls ``on_message(frames)`` for every message arriving on ``sock``, from the loop's reader callback."""

    def __init__(self, sock: zmq.Socket, on_message: Callable[[list[zmq.Frame]], None]) -> None:
        self.sock = sync_view(sock)
        self.on_message = on_message
        self.loop = asyncio.get_running_loop()
        self.fd: int = self.sock.FD
        self._scheduled = False
        self.closed = False
        self.loop.add_reader(self.fd, self._drain)
        self._again()  # messages queued before we watched

    def kick(self) -> None:
        """Drain soon if a message is waiting (call after a send on the same socket)."""
        if not self._scheduled and not self.closed and readable(self.sock):
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def _again(self) -> None:
        if not self._scheduled and not self.closed:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        for _ in range(DRAIN_CAP):
            try:
                if not readable(sock):  # (cheaper than raising zmq.Again)
                    return
                frames = recv_frames(sock)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # closed under us
                log.info("reader_stopped", error=str(exc))
                self.close()
                return
            try:
                self.on_message(frames)
            except Exception:  # one bad message never stops the reader
                log.exception("reader_callback_failed")
        self._again()  # more may be queued: the edge-triggered fd will not fire again for them

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.fd)


class Outbox:
    """A ROUTER's stream items to gateways, sent at the end of the loop tick: one frame per gateway. More data
    of a stream that already flows may wait up to ``LINGER_S`` (like TCP's Nagle, bounded): with many fast
    streams a gateway then wakes once per millisecond for all of them instead of once per stream and read.

    ``put`` returns False once that gateway is known to be gone (``on_gone(ident)`` is then called once). A
    gateway whose queue is full (HWM) gets its frames later, in order."""

    def __init__(self, sock: zmq.Socket, on_gone: Callable[[bytes], None], reader: Reader | None = None) -> None:
        self.sock = sync_view(sock)
        self.on_gone = on_gone
        self.reader = reader
        self.loop = asyncio.get_running_loop()
        self.pending: dict[bytes, list[StreamItem]] = {}
        self.blocked: dict[bytes, deque[bytes]] = {}
        self.gone: set[bytes] = set()
        self._soon = False  # a flush is scheduled for the end of this tick
        self._timer: asyncio.TimerHandle | None = None  # a flush is scheduled within LINGER_S

    def put(self, ident: bytes, item: StreamItem, urgent: bool = True) -> bool:
        """Queue ``item``: sent at the end of this loop tick, or, if not ``urgent`` (more of a stream that is
        already flowing), within ``LINGER_S``, together with what else comes meanwhile."""
        if ident in self.gone:
            return False
        items = self.pending.get(ident)
        if items is None:
            items = self.pending[ident] = []
        items.append(item)
        if urgent:
            if not self._soon:
                self._soon = True
                self.loop.call_soon(self.flush)
        elif not self._soon and self._timer is None:
            self._timer = self.loop.call_later(LINGER_S, self.flush)
        return True

    def flush(self) -> None:
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self.pending = self.pending, {}
        for ident, items in pending.items():
            frame = STREAM.encode(items)
            backlog = self.blocked.get(ident)
            if backlog is not None:
                backlog.append(frame)
            else:
                self._send(ident, frame)
        if self.reader is not None:
            self.reader.kick()

    def _send(self, ident: bytes, frame: bytes) -> bool:
        try:
            send_frames(self.sock, [ident, frame])  # (copying small frames beats zmq's gc thread)
            return True
        except zmq.Again:
            self.blocked.setdefault(ident, deque()).appendleft(frame)
            self.loop.call_later(RETRY_S, self._retry, ident)
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                log.warning("stream_send_failed", error=str(exc))
            self._gone(ident)
        return False

    def _retry(self, ident: bytes) -> None:
        backlog = self.blocked.pop(ident, None)
        while backlog:
            if not self._send(ident, backlog.popleft()):
                if ident in self.blocked:  # full again: _send put the frame back; keep the rest behind it
                    self.blocked[ident].extend(backlog)
                return

    def _gone(self, ident: bytes) -> None:
        if ident in self.gone:
            return
        if len(self.gone) > 4096:  # gateways restarted that often: forget the oldest knowledge
            self.gone.clear()
        self.gone.add(ident)
        self.blocked.pop(ident, None)
        log.info("gateway_unreachable")
        self.on_gone(ident)
