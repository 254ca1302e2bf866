"""Incremental parser of a ``text/event-stream`` body (the WHATWG server-sent events format).

llama-server streams ``/v1/chat/completions`` and ``/v1/completions`` as ``data: {json}\\n\\n``
events ending with ``data: [DONE]``; a failure in the middle of a stream arrives as a ``data:``
event whose JSON has an ``error`` key. The parser only frames events: it hands back each event's
data payload and leaves the JSON to the caller. Pure, no I/O.
"""

from __future__ import annotations

__all__ = ["SSEParser", "DONE"]

DONE = b"[DONE]"
_BOM = b"\xef\xbb\xbf"


class SSEParser:
    """Incremental parser of a text/event-stream byte stream (chunks split anywhere, \\n or \\r\\n).

    ``feed`` returns the data payloads of the events completed by the bytes given (the lines of a
    multi-line ``data`` field joined by ``\\n``); comments and the other fields (``event``, ``id``,
    ``retry``, anything unknown) are ignored. ``done`` becomes True once a ``data: [DONE]`` payload is
    seen; that payload itself is not returned.
    """

    __slots__ = ("done", "_buf", "_data", "_has_data", "_started")

    def __init__(self) -> None:
        self.done: bool = False
        self._buf = b""  # bytes of an incomplete line
        self._data: list[bytes] = []  # data lines of the event being read
        self._has_data = False
        self._started = False  # a leading BOM has been checked for

    def feed(self, data: bytes) -> list[bytes]:
        if not data:
            return []
        buf = self._buf + bytes(data) if self._buf else bytes(data)
        if not self._started:
            started = self._start(buf)
            if started is None:
                return []
            buf = started
        if not self._has_data and b"\r" not in buf:
            fast = self._simple_events(buf)
            if fast is not None:
                return fast
        lines = buf.splitlines(keepends=True)  # bytes split only on \r, \n and \r\n
        if not lines:
            self._buf = b""
            return []
        last = lines[-1]
        # An unterminated last line waits for more bytes; so does one ending in a lone \r, which
        # may be the first half of a \r\n split across two chunks.
        if last.endswith(b"\n"):
            self._buf = b""
        else:
            self._buf = last
            lines.pop()
        out: list[bytes] = []
        for raw in lines:
            self._line(raw.rstrip(b"\r\n"), out)
        return out

    def whole_events(self, data: bytes) -> bytes | None:
        """Take ``data``; return the simple events it completes as one buffer (ending in a blank line; b"" when none
        is complete yet), keeping the rest for later, so that the caller may read them its own way (or hand them
        to ``events_of``). None, with nothing taken, unless the stream so far is simple: no CR, no event half read
        by ``feed`` (then call ``feed``)."""
        if self._has_data or self.done or b"\r" in data or b"\r" in self._buf:
            return None
        buf = self._buf + data if self._buf else data
        if not self._started:  # (a stream's first bytes: most of a short answer, often)
            started = self._start(buf)
            if started is None:
                return b""
            buf = started
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._buf = buf
            return b""
        self._buf = buf[cut + 2 :]
        return buf[: cut + 2]

    def _start(self, buf: bytes) -> bytes | None:
        """A stream's first bytes without a leading BOM; None (kept for later) while they could still be one."""
        if len(buf) < len(_BOM) and _BOM.startswith(buf):
            self._buf = buf
            return None
        self._started = True
        return buf[len(_BOM) :] if buf.startswith(_BOM) else buf

    def events_of(self, whole: bytes) -> list[bytes]:
        """The payloads of a buffer ``whole_events`` returned (``done`` is set on ``[DONE]``, as ``feed`` does)."""
        rest, self._buf = self._buf, b""
        try:
            return self.feed(whole)
        finally:
            self._buf = rest

    def _simple_events(self, buf: bytes) -> list[bytes] | None:
        """Fast path: events that are each one ``data: ...`` line (what llama-server sends), split in one C call;
        None (the line parser takes the buffer) when any event is not that simple."""
        events = buf.split(b"\n\n")
        tail = events.pop()  # an incomplete event: kept for the next feed
        out: list[bytes] = []
        for event in events:
            if not event.startswith(b"data: ") or b"\n" in event:
                return None
            if event == b"data: [DONE]":
                self.done = True
            else:
                out.append(event[6:])
        self._buf = tail
        return out

    def flush(self) -> list[bytes]:
        """End of stream: the last line, even without its terminator, completes (for robustness).

        Per the spec an event not followed by a blank line is discarded, but an upstream that
        closes right after its last ``data:`` line has still sent that data; hand it over.
        """
        out: list[bytes] = []
        rest, self._buf = self._buf, b""
        for line in rest.splitlines():  # (the unparsed rest may hold whole lines of an unfinished event)
            self._line(line, out)
        self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if not line:  # blank line: dispatch the event
            if self._has_data:
                payload = b"\n".join(self._data)
                self._data = []
                self._has_data = False
                if payload == DONE:
                    self.done = True
                else:
                    out.append(payload)
            return
        if line[0] == 0x3A:  # ":" comment (llama-server's keep-alive pings)
            return
        field, sep, value = line.partition(b":")
        if field != b"data":
            return
        if sep and value[:1] == b" ":
            value = value[1:]
        self._data.append(value)
        self._has_data = True
