"""Offline tests of the metrics pieces: worker token/TTFT counting, the hub, Prometheus names, log paths, auth."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus.codec import EVENTS
from bus.protocol import GatewayMetrics, RequestEvent, WorkerMetrics, WorkerState
from dashboard import auth, prom
from dashboard.hub import Hub
from dashboard.logtail import _Follower, log_paths
from workers.metrics import WorkerStats

GOLDEN = Path(__file__).resolve().parents[1] / "gateway" / "golden"


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [37, 400, 1 << 20])
def test_stream_tokens_counted_without_parsing_and_exact_at_the_end(size: int) -> None:
    stream = (GOLDEN / "chat_stream.txt").read_bytes()
    stats = WorkerStats("m")
    stats.queued("r1", "/v1/chat/completions", True)
    stats.started("r1")
    for chunk in _chunks(stream, size):
        stats.data("r1", chunk)
    assert stats.ttft_last > 0 and stats.ttft_p50() == stats.ttft_last
    stats.finished("r1", 200, "ok")
    # the golden stream's usage says 12 completion tokens; the total never goes down
    assert stats.tokens_total == 12
    assert not stats.live


def test_non_stream_tokens_from_usage() -> None:
    body = (GOLDEN / "chat.json").read_bytes()
    stats = WorkerStats("m")
    stats.queued("r", "/v1/chat/completions", False)
    stats.started("r")
    stats.data("r", body)
    stats.finished("r", 200, "ok")
    want = msgspec.json.decode(body)["usage"]["completion_tokens"]
    assert stats.tokens_total == want > 0


def _recording_stats() -> tuple[WorkerStats, list[list[bytes]]]:
    """A worker's figures whose published events are kept (frames, in order)."""
    sent: list[list[bytes]] = []

    class FakePub:
        def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
            sent.append(frames)

    return WorkerStats("m", pub=FakePub()), sent  # type: ignore[arg-type]


def test_only_streamed_tokens_have_a_time_to_first_token() -> None:
    """A non-streaming answer (or an error, or an embedding) has no first token a client sees: counted as one, its
    whole time went into the TTFT figures (a 2.5 s answer read as a 2.5 s TTFT)."""
    stats, sent = _recording_stats()
    stats.queued("r", "/v1/chat/completions", False)
    stats.started("r")
    assert stats.data("r", (GOLDEN / "chat.json").read_bytes())  # (the answer flows: its later reads may wait)
    stats.finished("r", 200, "ok")
    stats.queued("e", "/v1/chat/completions", True)
    stats.started("e")
    assert not stats.data("e", b'{"error":{"code":400,"message":"bad schema","type":"invalid_request_error"}}')
    stats.finished("e", 400, "error")
    events = [EVENTS.decode(f[1]) for f in sent]
    assert "first_token" not in [e.phase for e in events]  # type: ignore[union-attr]
    assert stats.ttft_last == 0 and not stats.ttfts and stats.tokens_total > 0
    assert all(e.ttft_s == 0 for e in events if e.phase == "finished")  # type: ignore[union-attr]


@pytest.mark.parametrize(("tail", "want"), [
    (b'"timings":{"predicted_n":7,"predicted_ms":1}', 7),
    (b'"predicted_n": 12}', 12),
    (b'{"predicted_n":3} ... {"predicted_n":41}', 41),  # the last: the answer's own timings
    (b'"predicted_n":}', None),
    (b'"predicted_n":4', 4),  # cut right after the digits
    (b"no timings", None),
])
def test_the_exact_token_count_is_the_number_after_the_last_key(tail: bytes, want: int | None) -> None:
    from workers.metrics import _PREDICTED, _last_count

    assert _last_count(bytearray(tail), _PREDICTED) == want


def test_rates_and_unknown_requests_are_harmless() -> None:
    stats = WorkerStats("m")
    stats.data("nope", b"data: x")
    stats.finished("nope", 200, "ok")
    stats.tokens_total = 50
    tps, rps = stats.rates(3)
    assert tps > 0 and rps > 0
    assert stats.rates(3) == (0.0, 0.0)


def test_request_events_are_published_in_order() -> None:
    stats, sent = _recording_stats()
    stats.queued("r", "/v1/chat/completions", True, "/api/chat", "ollama")
    stats.started("r")
    stats.data("r", b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n')
    stats.finished("r", 200, "ok")
    events = [EVENTS.decode(f[1]) for f in sent]
    assert {f[0] for f in sent} == {b"request/m/"}
    assert [e.phase for e in events] == ["queued", "started", "first_token", "finished"]  # type: ignore[union-attr]
    # every phase says where it came in (started and first_token said "")
    assert {(e.route, e.gateway) for e in events} == {("/api/chat", "ollama")}  # type: ignore[union-attr]
    last = events[-1]
    assert isinstance(last, RequestEvent) and last.tokens == 1 and last.status == 200 and last.v == 1


def _hub_with_figures() -> Hub:
    hub = Hub("/nonexistent")
    hub.apply_status({"workers": [{"name": "a", "state": "ready", "restarts": 2, "pid": 5}],
                      "processes": [{"name": "gateway-openai", "state": "running", "restarts": 0, "pid": 9}]})
    for ev in (WorkerMetrics(name="a", state=WorkerState.READY, tokens_total=42, tokens_per_s=7.5,
                             ttft_last_s=0.2, ttft_p50_s=0.1, rss_bytes=100),
               GatewayMetrics(name="gateway-openai", protocol="openai", requests_total=3, open_streams=1),
               RequestEvent(request_id="x", model="a", phase="finished", outcome="ok")):
        hub.apply(msgspec.json.decode(EVENTS.encode(ev)))
    return hub


def test_prometheus_names_and_values() -> None:
    text = prom.render(prom.registry(_hub_with_figures())).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("llama_runner_worker_tokens_generated_total", (("model", "a"),))] == 42
    assert samples[("llama_runner_worker_tokens_per_second", (("model", "a"),))] == 7.5
    assert samples[("llama_runner_worker_restarts_total", (("model", "a"),))] == 2
    assert samples[("llama_runner_worker_up", (("model", "a"),))] == 1
    assert samples[("llama_runner_worker_state", (("model", "a"), ("state", "ready")))] == 1
    assert samples[("llama_runner_gateway_requests_total", (("protocol", "openai"),))] == 3
    assert samples[("llama_runner_gateway_open_streams", (("protocol", "openai"),))] == 1
    assert all(name.startswith("llama_runner_") for name, _ in samples)


def test_hub_fans_out_and_drops_for_slow_listeners() -> None:
    hub = Hub("/nonexistent")
    q = hub.listen()
    for _ in range(5000):
        hub.broadcast(b"{}")
    assert q.qsize() == q.maxsize  # bounded: a slow browser loses events, the hub never blocks
    hub.unlisten(q)
    hub.broadcast(b"{}")
    assert q.qsize() == q.maxsize


def test_status_removes_models_gone_from_the_config() -> None:
    hub = _hub_with_figures()
    hub.apply_status({"workers": [{"name": "b", "state": "stopped"}], "processes": []})
    assert list(hub.workers) == ["b"]


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "x/../../y", ".hidden", "a\\b", ""])
def test_log_paths_never_leave_the_logs_dir(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        log_paths(tmp_path, name)


def test_log_follower_starts_at_the_tail_and_follows(tmp_path: Path) -> None:
    path = log_paths(tmp_path, "m")["worker"]
    path.write_text("".join(f"line {i}\n" for i in range(5000)))
    f = _Follower("worker", path)
    first = f.read()
    assert first[-1] == "line 4999" and len(first) < 5000 and first[0].startswith("line ")
    with path.open("a") as out:
        out.write("new one\npartial")
    assert f.read() == ["new one"]
    with path.open("a") as out:
        out.write(" done\n")
    assert f.read() == ["partial done"]


def test_token_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(auth.ENV_TOKEN, raising=False)
    assert auth.dashboard_token("127.0.0.1", None) is None
    assert auth.dashboard_token("localhost", None) is None
    assert auth.dashboard_token("::1", None) is None
    assert auth.dashboard_token("127.0.0.1", "set") == "set"
    made = auth.dashboard_token("0.0.0.0", None)
    assert made and len(made) >= 20
    monkeypatch.setenv(auth.ENV_TOKEN, "from-up")
    assert auth.dashboard_token("0.0.0.0", None) == "from-up"
    assert auth.dashboard_token("0.0.0.0", "configured") == "configured"


def test_request_events_are_subscribed_only_while_a_browser_watches() -> None:
    import zmq

    calls: list[tuple[int, bytes]] = []

    class FakeSub:
        def setsockopt(self, opt: int, value: bytes) -> None:
            calls.append((opt, value))

    hub = Hub("/nonexistent")
    hub._sub = FakeSub()  # type: ignore[attr-defined]
    q1, q2 = hub.listen(), hub.listen()
    assert calls == [(zmq.SUBSCRIBE, b"request/")]
    hub.unlisten(q1)
    assert len(calls) == 1  # one browser still watches
    hub.unlisten(q2)
    assert calls[-1] == (zmq.UNSUBSCRIBE, b"request/")


def test_a_worker_gone_keeps_its_totals_but_no_process_figures() -> None:
    """A worker killed sends no last figures: its last periodic ones (memory, uptime, tokens/s) stayed for good."""
    hub = Hub("/nonexistent")
    hub.apply({"type": "worker_metrics", "name": "a", "state": "ready", "pid": 5, "rss_bytes": 100, "uptime_s": 9.0,
               "tokens_per_s": 3.0, "tokens_total": 42})
    hub.apply({"type": "worker_state", "name": "a", "state": "backoff", "pid": 0, "restarts": 1})
    a = hub.workers["a"]
    assert (a["rss_bytes"], a["uptime_s"], a["tokens_per_s"], a["pid"]) == (0, 0, 0, 0)
    assert a["tokens_total"] == 42 and a["restarts"] == 1


def test_a_models_counters_go_on_across_its_processes() -> None:
    """Each worker process counts from 0: /metrics' *_total of a model that loads and unloads often went back to
    0 at each load (a Prometheus rate read ~1/6 of its requests)."""
    hub = Hub("/nonexistent")

    def figures(pid: int, requests: int, tokens: int) -> None:
        hub.apply({"type": "worker_metrics", "name": "a", "state": "ready", "pid": pid, "requests_total": requests,
                   "tokens_total": tokens, "errors_total": 0})

    figures(5, 3, 30)
    figures(5, 4, 40)
    hub.apply({"type": "worker_state", "name": "a", "state": "stopped", "pid": 0})
    assert hub.workers["a"]["requests_total"] == 4
    figures(9, 1, 5)  # (the model loaded again: a new process)
    figures(9, 2, 8)
    a = hub.workers["a"]
    assert (a["requests_total"], a["tokens_total"], a["errors_total"]) == (6, 48, 0)
    text = prom.render(prom.registry(hub)).decode()
    assert "llama_runner_worker_requests_total{model=\"a\"} 6.0" in text


def test_a_responses_api_stream_counts_its_tokens() -> None:
    stats = WorkerStats("m")
    stats.queued("r", "/v1/responses", True)
    stats.started("r")
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
    assert not stats.data("r", b'event: response.created\ndata: {"type":"response.created"}\n\n')
    assert stats.data("r", delta * 2)
    assert stats.ttft_last > 0 and stats.tokens_total == 2
    stats.data("r", b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
                    b'{"input_tokens":9,"output_tokens":3}}}\n\n')
    stats.finished("r", 200, "ok")
    assert stats.tokens_total == 3  # (the exact figure at the end)


def test_the_models_table_shows_a_whisper_model_as_it_is(tmp_path: Path) -> None:
    """Its size is its files' (it showed 4096 bytes: the folder's, "0 MB") and its settings its own (it showed
    llama settings it ignores: ctx 2048, ...)."""
    import json as _json

    from config.loader import load_config
    from dashboard.app import _shown_parameters

    model_dir = tmp_path / "w"
    model_dir.mkdir()
    (model_dir / "model.bin").write_bytes(b"x" * 10_000)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "app_config.json").write_text("{}")
    (cfg / "models_config.json").write_text(_json.dumps({"models": {"w": {
        "type": "whisper", "model_path": str(model_dir), "whisper": {"cpu_threads": 2, "beam_size": 3}}}}))
    config = load_config(cfg)
    m = config.models.models["w"]
    assert config.model_size(m) == 10_000
    shown = _shown_parameters(m)
    assert shown["ctx_size"] is None and shown["threads"] == 2 and "beam_size=3" in shown["extra_args"]


def test_an_event_of_the_wrong_shape_is_dropped_not_kept_to_fail_the_prometheus_page() -> None:
    """A frame with a string where a number goes was kept (the decoder took any JSON): /metrics answered 500 until
    the next status merge; the README says every frame is decoded against the message types."""
    hub = _hub_with_figures()
    before = prom.render(prom.registry(hub))
    hub._on_frames([b"metrics/worker/fake/",
                    b'{"type":"worker_metrics","name":"fake","state":"ready","cpu_percent":"abc"}'])
    hub._on_frames([b"metrics/worker/fake/", b"not json"])
    assert "fake" not in hub.workers
    assert prom.render(prom.registry(hub)) == before
    good = EVENTS.encode(WorkerMetrics(name="fake", state=WorkerState.READY, cpu_percent=5.0))
    hub._on_frames([b"metrics/worker/fake/", good])
    assert hub.workers["fake"]["cpu_percent"] == 5.0
