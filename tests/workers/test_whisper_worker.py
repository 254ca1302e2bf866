"""The whisper worker process against a stand-in supervisor: hello, jobs, queue, cancel, stop, bad model dir.

No gateway: the test talks the bus protocol itself (a ROUTER as the supervisor's control socket, a DEALER
as a gateway), with the real faster-whisper tiny.en model.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import zmq

from bus import endpoints
from bus.codec import COMMANDS, EVENTS, JOBS, STREAM
from bus.protocol import (
    Cancel,
    Data,
    End,
    Fail,
    Head,
    HttpJob,
    ModelParams,
    RequestEvent,
    StreamItem,
    TranscribeJob,
    WorkerHello,
    WorkerLaunch,
    WorkerMetrics,
    WorkerState,
)
from tests.conftest import ROOT
from tests.speech import need_whisper_model, speech_wav, words

LONG_TEXT = ("The quick brown fox jumps over the lazy dog. Please open the window before the meeting starts. "
             "Good morning everyone, welcome to the weekly review. The weather today is sunny with a light breeze "
             "from the west. We will discuss the budget, the schedule and the new office. After lunch the team "
             "will visit the factory near the river. Remember to bring your badge and a pair of safety shoes. "
             "The train leaves at seven and arrives in the city at nine. Thank you all for coming.")


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    control: zmq.Socket[bytes]
    events: zmq.Socket[bytes]  # an XSUB where the supervisor's is: the worker's PUB connects here
    endpoint: str
    run_dir: Path

    def request_events(self, rid: str, timeout: float = 10) -> list[RequestEvent]:
        """This request's events, up to its "finished" one."""
        out: list[RequestEvent] = []
        deadline = time.monotonic() + timeout
        while not out or out[-1].phase != "finished":
            left = deadline - time.monotonic()
            if left <= 0 or not self.events.poll(int(left * 1000)):
                raise AssertionError(f"no finished event for {rid}: {out}")
            topic, body = self.events.recv_multipart()
            if not topic.startswith(endpoints.topic_request("whisper-test").encode()):
                continue
            ev = EVENTS.decode(body)
            if isinstance(ev, RequestEvent) and ev.request_id == rid:
                out.append(ev)
        return out

    def next_metrics(self, timeout: float = 5) -> WorkerMetrics:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self.events.poll(int(left * 1000)):
            topic, body = self.events.recv_multipart()
            ev = EVENTS.decode(body)
            if isinstance(ev, WorkerMetrics):
                return ev
        raise AssertionError("no worker_metrics event")

    def hello(self, timeout: float = 60) -> WorkerHello:
        if not self.control.poll(int(timeout * 1000)):
            raise AssertionError(f"no hello within {timeout}s; exit code {self.proc.poll()}")
        msg = COMMANDS.decode(self.control.recv_multipart()[1])
        assert isinstance(msg, WorkerHello)
        return msg


def start_worker(model_path: Path | str, queue_size: int = 8) -> Worker:
    run_dir = Path(tempfile.mkdtemp(prefix="lrw-", dir="/tmp"))
    ctx = zmq.Context.instance()
    control = ctx.socket(zmq.ROUTER)
    control.linger = 0
    control.bind(endpoints.control(run_dir))
    events = ctx.socket(zmq.XSUB)  # as the supervisor's metrics proxy: it subscribes once the worker is up
    events.linger = 0
    events.bind(endpoints.metrics_in(run_dir))
    launch = WorkerLaunch(name="whisper-test", kind="whisper", model_path=str(model_path), run_dir=str(run_dir),
                          logs_dir=str(run_dir / "logs"), supervisor_pid=os.getpid(), queue_size=queue_size,
                          params=ModelParams(parallel=1))
    proc = subprocess.Popen([sys.executable, "-m", "workers", msgspec.json.encode(launch).decode()], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(run_dir / "worker.err", "wb"))
    return Worker(proc, control, events, endpoints.worker(run_dir, "whisper-test", proc.pid), run_dir)


def stop_worker(w: Worker) -> None:
    if w.proc.poll() is None:
        w.proc.kill()
        w.proc.wait()
    w.control.close(0)
    w.events.close(0)
    shutil.rmtree(w.run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = start_worker(need_whisper_model(), queue_size=1)
    try:
        assert w.hello().state == WorkerState.STARTING
        ready = w.hello()
        assert ready.state == WorkerState.READY and ready.endpoint == w.endpoint, ready
        w.events.send(b"\x01")  # subscribe to everything; the first metrics event proves it took effect
        assert w.events.poll(10_000), "no metrics from the worker"
        yield w
    finally:
        stop_worker(w)


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("speech")
    # ~110 s: four of whisper's 30 s windows (segments come out a window at a time)
    long_text = " ".join(f"Part {n}. {LONG_TEXT}" for n in ("one", "two", "three", "four"))
    return {"short": speech_wav("good morning everyone", d / "short.wav").read_bytes(),
            "long": speech_wav(long_text, d / "long.wav").read_bytes()}


@pytest.fixture()
def gw(worker: Worker) -> Iterator[zmq.Socket[bytes]]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(worker.endpoint)
    yield sock
    sock.close(0)


_unread: dict[int, collections.deque[StreamItem]] = collections.defaultdict(collections.deque)


def items(sock: zmq.Socket[bytes], rid: str | None = None, timeout: float = 60) -> Iterator[StreamItem]:
    """Stream items (of ``rid`` if given) until one of them is End or Fail. A frame carries the worker's items
    of one loop tick: those not taken yet wait for the next call."""
    deadline = time.monotonic() + timeout
    unread = _unread[id(sock)]
    while True:
        if not unread:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                raise AssertionError(f"no End/Fail within {timeout}s")
            unread.extend(STREAM.decode(sock.recv()))
        item = unread.popleft()
        if rid is not None and item.request_id != rid:
            continue
        yield item
        if isinstance(item, End | Fail):
            return


def transcribe(sock: zmq.Socket[bytes], rid: str, audio: bytes) -> list[StreamItem]:
    sock.send(JOBS.encode(TranscribeJob(request_id=rid, audio=audio)))
    return list(items(sock, rid))


def lines(got: list[StreamItem]) -> list[dict[str, object]]:
    data = b"".join(i.data for i in got if isinstance(i, Data))
    return [msgspec.json.decode(x) for x in data.splitlines() if x]


def test_transcribes_as_ndjson_lines(gw: zmq.Socket[bytes], audio: dict[str, bytes]) -> None:
    got = transcribe(gw, "ok-1", audio["short"])
    assert isinstance(got[0], Head) and got[0].status == 200 and got[0].content_type == "application/x-ndjson"
    assert isinstance(got[-1], End)
    out = lines(got)
    assert out[0]["type"] == "info" and all(x["type"] == "segment" for x in out[1:])
    assert words("".join(str(x["text"]) for x in out[1:])) == ["good", "morning", "everyone"]


def test_request_events_for_the_dashboard(worker: Worker, gw: zmq.Socket[bytes], audio: dict[str, bytes]) -> None:
    gw.send(JOBS.encode(TranscribeJob(request_id="ev-1", audio=audio["short"], route="/v1/audio/transcriptions",
                                      gateway="ollama")))
    assert isinstance(list(items(gw, "ev-1"))[-1], End)
    evs = worker.request_events("ev-1")
    assert [e.phase for e in evs] == ["queued", "started", "finished"]  # (first_token: streamed requests only)
    done = evs[-1]
    assert done.path == "/v1/audio/transcriptions" and done.status == 200 and done.outcome == "ok"
    assert done.tokens > 3 and done.ttft_s == 0  # (no first token: as a llama worker's non-streamed answers)
    gw.send(JOBS.encode(TranscribeJob(request_id="ev-s", audio=audio["short"], stream=True)))
    assert isinstance(list(items(gw, "ev-s"))[-1], End)
    streamed = worker.request_events("ev-s")
    assert [e.phase for e in streamed] == ["queued", "started", "first_token", "finished"]
    assert 0 < streamed[-1].ttft_s <= streamed[-1].duration_s
    assert done.gateway == "ollama" and evs[0].gateway == "ollama"  # (where it came in: it was "")
    (fail,) = transcribe(gw, "ev-2", b"not audio" * 30)
    assert isinstance(fail, Fail)
    assert worker.request_events("ev-2")[-1].status == 400
    # a client's bad audio is no error of the worker's (errors: 5xx, as llama workers count them)
    assert worker.next_metrics().errors_total == 0


def test_bad_audio_is_a_400_and_the_worker_carries_on(gw: zmq.Socket[bytes], audio: dict[str, bytes]) -> None:
    for rid, data in (("bad-1", b"definitely not audio" * 40), ("bad-2", b"")):
        (fail,) = transcribe(gw, rid, data)
        assert isinstance(fail, Fail) and fail.status == 400 and fail.code == "invalid_audio", fail
    assert isinstance(transcribe(gw, "ok-2", audio["short"])[-1], End)


def test_llama_requests_are_refused(gw: zmq.Socket[bytes]) -> None:
    gw.send(JOBS.encode(HttpJob(request_id="chat-1", path="/v1/chat/completions", body=b"{}")))
    (fail,) = items(gw, "chat-1")
    assert isinstance(fail, Fail) and fail.status == 400 and "speech-to-text" in fail.message


def test_queue_full_is_429_and_cancel_stops_a_running_job(gw: zmq.Socket[bytes], audio: dict[str, bytes]) -> None:
    # queue_size=1, one slot: the first runs, the second waits, the third is refused
    for rid in ("long-1", "short-q", "short-x"):
        gw.send(JOBS.encode(TranscribeJob(request_id=rid, audio=audio["long" if rid == "long-1" else "short"])))
    first: dict[str, list[StreamItem]] = {}
    while "short-x" not in first or "long-1" not in first:  # the refusal, and the long job's first output
        item = next(items(gw))
        first.setdefault(item.request_id, []).append(item)
    (refused,) = first["short-x"]
    assert isinstance(refused, Fail) and refused.status == 429 and refused.code == "busy"
    assert isinstance(first["long-1"][0], Head)
    gw.send(JOBS.encode(Cancel(request_id="long-1")))
    # the queued job gets the slot once the long one stopped at its next segment
    rest: list[StreamItem] = []
    for item in items(gw, timeout=180):
        if item.request_id == "long-1":
            first["long-1"].append(item)
            assert not isinstance(item, End), "a cancelled job ran to its end"
        else:
            rest.append(item)
            if isinstance(item, End | Fail):
                break
    assert isinstance(rest[-1], End), rest
    assert words("".join(str(x["text"]) for x in lines(rest)[1:])) == ["good", "morning", "everyone"]
    # at most the window being decoded when the cancel came was finished: the last ones never were
    long_lines = lines(first["long-1"])
    assert long_lines[0]["type"] == "info" and float(str(long_lines[0]["duration"])) > 90
    assert max((float(str(x["end"])) for x in long_lines[1:]), default=0.0) <= 60.5, long_lines[-1]


def test_missing_model_dir_is_fatal_without_download(tmp_path: Path) -> None:
    w = start_worker(tmp_path / "tiny.en")  # a hub name, were it handed to faster-whisper
    try:
        assert w.hello().state == WorkerState.STARTING
        fatal = w.hello()
        assert fatal.state == WorkerState.FATAL and "not found" in fatal.message, fatal
        assert w.proc.wait(30) == 3
    finally:
        stop_worker(w)


def test_sigterm_stops_cleanly() -> None:
    w = start_worker(need_whisper_model())
    try:
        assert w.hello().state == WorkerState.STARTING
        assert w.hello().state == WorkerState.READY
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(15) == 0
        assert w.hello(5).state == WorkerState.STOPPED
    finally:
        stop_worker(w)
