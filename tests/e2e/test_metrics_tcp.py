"""The metrics bus on tcp (for local apps that cannot reach the run dir), when a port is configured."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import zmq

from tests.conftest import ROOT, free_port, start_system, stop_system

pytestmark = pytest.mark.e2e


def test_metrics_bus_on_configured_tcp_port() -> None:
    cfg = Path(tempfile.mkdtemp(prefix="lr-cfg-t-"))
    port = free_port()
    app = json.loads((ROOT / "config" / "app_config.json").read_text())
    app["metrics"] = {"tcp_port": port}
    (cfg / "app_config.json").write_text(json.dumps(app))
    shutil.copy(ROOT / "config" / "models_config.json", cfg / "models_config.json")
    system = start_system(cfg)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    try:
        sub.connect(f"tcp://127.0.0.1:{port}")
        sub.setsockopt(zmq.SUBSCRIBE, b"metrics/system/")
        assert sub.poll(10_000), "no system metrics on the tcp endpoint within 10 s"
        topic, body = sub.recv_multipart()
        event = json.loads(body)
        assert topic == b"metrics/system/" and event["type"] == "system_metrics" and event["v"] >= 1
    finally:
        sub.close()
        ctx.term()
        assert stop_system(system) == 0
        shutil.rmtree(cfg, ignore_errors=True)
