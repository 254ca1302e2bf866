"""A whisper worker's request figures: per-request events (queued, started, first segment, finished) on
``request/<model>/`` and the rates behind its WorkerMetrics — the same events and fields as llama workers
publish (workers/metrics.py), so the dashboard shows both kinds alike. "Tokens" are whisper's output tokens;
"first token" is the first decoded segment."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from workers.metrics import RequestFigures


@dataclass
class _Live:
    path: str
    stream: bool
    arrived: float = field(default_factory=time.monotonic)
    started: float = 0.0
    first: float = 0.0
    route: str = ""  # the client's path (the backend path when the gateway did not say)
    gateway: str = ""


@dataclass
class WhisperStats(RequestFigures):
    live: dict[str, _Live] = field(default_factory=dict)

    @staticmethod
    def path(task: str) -> str:
        return "/v1/audio/translations" if task == "translate" else "/v1/audio/transcriptions"

    def queued(self, rid: str, task: str, stream: bool, route: str = "", gateway: str = "") -> None:
        st = self.live[rid] = _Live(self.path(task), stream)
        st.route, st.gateway = route or st.path, gateway
        self._emit(rid, "queued", path=st.path, stream=stream, route=st.route, gateway=gateway)

    def started(self, rid: str) -> None:
        st = self.live.get(rid)
        if st is not None:
            st.started = time.monotonic()
            self._emit(rid, "started", path=st.path, stream=st.stream, queued_s=st.started - st.arrived)

    def segment(self, rid: str) -> None:
        """A decoded segment went out (a streamed request's first one is its "first token")."""
        st = self.live.get(rid)
        if st is None or st.first or not st.stream:
            return
        st.first = time.monotonic()
        self.ttft_last = st.first - st.arrived
        self.ttfts.append(self.ttft_last)
        self._emit(rid, "first_token", path=st.path, stream=st.stream, ttft_s=self.ttft_last)

    def finished(self, rid: str, status: int, outcome: str, tokens: int = 0) -> None:
        st = self.live.pop(rid, None)
        if st is None:
            return
        self.tokens_total += tokens
        self._emit_finished(rid, st, tokens, status, outcome)
