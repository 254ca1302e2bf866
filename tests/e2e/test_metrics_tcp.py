"""The metrics bus on tcp (for local apps that cannot reach the run dir), when a port is configured."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
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


def test_metrics_tcp_with_curve_lets_only_allowed_subscribers_in(tmp_path: Path) -> None:
    import zmq.auth

    keys, clients = tmp_path / "keys", tmp_path / "clients"
    clients.mkdir()
    client_pub, client_sec = zmq.auth.load_certificate(zmq.auth.create_certificates(str(tmp_path), "client")[1])
    (clients / "client.key").write_bytes((tmp_path / "client.key").read_bytes())
    _, other_sec = zmq.auth.load_certificate(zmq.auth.create_certificates(str(tmp_path), "other")[1])
    other_pub, _ = zmq.auth.load_certificate(str(tmp_path / "other.key"))
    cfg = Path(tempfile.mkdtemp(prefix="lr-cfg-c-"))
    port = free_port()
    app = json.loads((ROOT / "config" / "app_config.json").read_text())
    app["metrics"] = {"tcp_port": port, "curve": True, "curve_keys_dir": str(keys), "curve_clients_dir": str(clients)}
    (cfg / "app_config.json").write_text(json.dumps(app))
    shutil.copy(ROOT / "config" / "models_config.json", cfg / "models_config.json")
    system = start_system(cfg)
    ctx = zmq.Context()
    socks = []
    try:
        server_pub, _ = zmq.auth.load_certificate(str(keys / "server.key"))
        assert (keys / "server.key_secret").stat().st_mode & 0o777 == 0o600

        def subscriber(public: bytes | None, secret: bytes | None) -> zmq.Socket:  # type: ignore[type-arg]
            s = ctx.socket(zmq.SUB)
            s.linger = 0
            if public is not None:
                s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server_pub
            s.connect(f"tcp://127.0.0.1:{port}")
            s.setsockopt(zmq.SUBSCRIBE, b"metrics/system/")
            socks.append(s)
            return s

        allowed = subscriber(client_pub, client_sec)
        stranger = subscriber(other_pub, other_sec)  # a valid key pair that is not in the allowed folder
        plain = subscriber(None, None)  # no encryption at all
        assert allowed.poll(10_000), "the allowed subscriber got nothing"
        assert json.loads(allowed.recv_multipart()[1])["type"] == "system_metrics"
        assert not stranger.poll(3_000) and not plain.poll(100)
        # a certificate added later is let in at the next reload (it waited for a restart of `up`)
        (clients / "other.key").write_bytes((tmp_path / "other.key").read_bytes())
        assert system.cli("reload").returncode == 0
        late = subscriber(other_pub, other_sec)
        assert late.poll(10_000), "the subscriber let in by the reload got nothing"
        # a certificate taken away cuts its subscriber off at the reload (a connected one went on receiving)
        (clients / "other.key").unlink()
        said = system.cli("reload")
        assert said.returncode == 0 and "removed" in said.stdout + said.stderr, said
        for s in (late, allowed):
            while s.poll(0):
                s.recv_multipart()
        assert allowed.poll(10_000), "the subscriber still let in got nothing after the reload"
        time.sleep(2)
        while late.poll(0):  # (what was on its way before the cut)
            late.recv_multipart()
        assert not late.poll(3_000), "the subscriber whose certificate was taken away still receives"
    finally:
        for s in socks:
            s.close()
        ctx.term()
        assert stop_system(system) == 0
        shutil.rmtree(cfg, ignore_errors=True)
