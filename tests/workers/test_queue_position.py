"""Queue positions: each waiting request learns its place, and its new place whenever the queue moves."""

from __future__ import annotations

from bus.codec import EVENTS
from bus.protocol import RequestEvent
from workers.metrics import WorkerStats


class FakePub:
    """The worker's event socket: the events it would publish."""

    def __init__(self, sent: list[RequestEvent]) -> None:
        self.sent = sent

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        ev = EVENTS.decode(frames[1])
        assert isinstance(ev, RequestEvent)
        self.sent.append(ev)


def test_positions_move_up_as_requests_start_or_leave() -> None:
    sent: list[RequestEvent] = []
    stats = WorkerStats("m", pub=FakePub(sent))  # type: ignore[arg-type]
    for rid in ("a", "b", "c", "d"):
        stats.queued(rid, "/v1/chat/completions", True)
    assert [(e.request_id, e.position) for e in sent] == [("a", 1), ("b", 2), ("c", 3), ("d", 4)]
    sent.clear()
    stats.started("a")
    assert [(e.request_id, e.phase, e.position) for e in sent] == [
        ("b", "position", 1), ("c", "position", 2), ("d", "position", 3), ("a", "started", 0)]
    sent.clear()
    stats.finished("c", 499, "cancelled")  # gave up while waiting: only those behind it move
    assert [(e.request_id, e.phase, e.position) for e in sent if e.phase == "position"] == [("d", "position", 2)]
    assert stats.waiting == ["b", "d"]


def test_a_request_the_full_queue_rejects_is_never_said_to_be_queued() -> None:
    """It got a 'queued' event at a place beyond the queue (9 of 8), then its rejection."""
    sent: list[RequestEvent] = []
    stats = WorkerStats("m", pub=FakePub(sent))  # type: ignore[arg-type]
    stats.queued("a", "/v1/chat/completions", True)
    stats.queued("b", "/v1/chat/completions", True, route="/api/chat", gateway="ollama", rejected=True)
    stats.finished("b", 429, "rejected")
    assert [(e.request_id, e.phase) for e in sent] == [("a", "queued"), ("b", "finished")]
    assert (sent[-1].status, sent[-1].outcome, sent[-1].route) == (429, "rejected", "/api/chat")
    assert stats.waiting == ["a"]
