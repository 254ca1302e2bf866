"""The floor the bus sets under the added latency: one round trip through pyzmq (a DEALER to a ROUTER over ipc, a
process each, as a gateway and a worker), against the same round trip over a plain unix socket, both paced like
the latency figures (a pause between round trips: the processes go idle, as between a client's requests).

A request of a gateway crosses the bus once each way, so the difference is what ZeroMQ's transport adds to each
request on this machine, whatever the code around it does: libzmq moves every message through an I/O thread on
both sides (the sender's thread wakes its I/O thread, which writes; the receiver's I/O thread reads and wakes the
receiving thread: three thread wakeups a hop where a plain socket has one).
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from tools.bench.figures import say, summary

ECHO = r"""
import socket, sys, zmq
kind, path = sys.argv[1], sys.argv[2]
if kind == "zmq":
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.linger = 0
    s.bind("ipc://" + path)
    print("ready", flush=True)
    while True:
        frames = s.recv_multipart()
        if frames[1] == b"":
            break
        s.send_multipart(frames)
else:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    print("ready", flush=True)
    conn, _ = listener.accept()
    while data := conn.recv(65536):
        conn.sendall(data)
"""
MESSAGE = b"j" * 300  # about a tiny request's job


def _echo(kind: str, path: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", ECHO, kind, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {kind} echo process did not start")
    return proc


def _round_trips(kind: str, path: str, samples: int, pause: float) -> list[float]:
    """``samples`` round trips (µs) after a warm-up, ``pause`` seconds apart."""
    proc = _echo(kind, path)
    ctx: zmq.Context[zmq.Socket[bytes]] | None = None
    try:
        if kind == "zmq":
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect("ipc://" + path)

            def once() -> None:
                sock.send(MESSAGE)
                sock.recv()
        else:
            usock = socket.socket(socket.AF_UNIX)
            usock.connect(path)

            def once() -> None:
                usock.sendall(MESSAGE)
                got = 0
                while got < len(MESSAGE):
                    got += len(usock.recv(65536))
        out = []
        for i in range(samples + 20):
            t0 = time.perf_counter()
            once()
            took = time.perf_counter() - t0
            if i >= 20:
                out.append(took * 1e6)
            time.sleep(pause)
        if kind == "zmq":
            sock.send(b"")
            sock.close(0)
        else:
            usock.close()
        return out
    finally:
        if ctx is not None:
            ctx.term()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(runs: int, samples: int, pause: float = 0.001) -> dict[str, Any]:
    """p50 round trip (µs) over pyzmq and over a unix socket, per run, alternating; and their difference."""
    p50: dict[str, list[float]] = {"zmq": [], "unix": []}
    with tempfile.TemporaryDirectory(prefix="lr-floor-") as tmp:
        for r in range(runs):
            for kind in ("zmq", "unix"):
                path = str(Path(tmp) / f"{kind}-{r}.sock")
                p50[kind].append(statistics.median(_round_trips(kind, path, samples, pause)))
            say(f"[bus floor] run {r + 1}/{runs}: round trip p50 µs: zmq {p50['zmq'][-1]:.0f}, "
                f"unix socket {p50['unix'][-1]:.0f}")
    return {
        "samples_per_run": samples,
        "pause_ms": pause * 1000,
        "rtt_p50_us": {k: summary(v) for k, v in p50.items()},
        "zmq_minus_unix_us": summary([a - b for a, b in zip(p50["zmq"], p50["unix"], strict=True)]),
    }
