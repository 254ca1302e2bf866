"""The tcp endpoint of the metrics bus is opened again when a CurveZMQ certificate is taken away: the endpoint just
closed frees its port a moment later, in libzmq's reaper thread, and the new bind came first 1 time in 3 (the
endpoint then stayed shut: the subscribers still let in got nothing)."""

from __future__ import annotations

import socket
from pathlib import Path

import zmq

from config.schema import MetricsConfig
from supervisor.metrics_tcp import TcpMetrics


def test_the_tcp_endpoint_opened_again_is_open_every_time(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = zmq.Context()
    tcp = TcpMetrics(ctx, tmp_path, "127.0.0.1", MetricsConfig(tcp_port=port))
    try:
        tcp.start()
        for i in range(15):
            sub = ctx.socket(zmq.SUB)  # (a subscriber connected: its connection is what the closing holds)
            sub.linger = 0
            sub.connect(f"tcp://127.0.0.1:{port}")
            tcp._restart_proxy()
            sub.close(0)
            assert tcp.thread is not None and tcp.thread.is_alive(), f"the endpoint stayed shut at restart {i}"
    finally:
        if tcp.thread is not None and tcp.thread.is_alive():
            steer = ctx.socket(zmq.PAIR)
            steer.connect("inproc://metrics-tcp-steer")
            steer.send(b"TERMINATE")
            tcp.thread.join(5)
            steer.close(0)
        ctx.term()
