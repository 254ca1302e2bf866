"""The metrics bus on tcp, for local apps that cannot reach the run dir; optionally encrypted with CurveZMQ.

A second proxy thread: an XSUB connected to the ipc XPUB feeds an XPUB bound on tcp (subscriptions travel back
up the chain), so that CURVE applies to the tcp endpoint only.

With ``metrics.curve``: the server's key pair lives in ``metrics.curve_keys_dir`` (``server.key`` is the public
certificate subscribers need, ``server.key_secret`` stays private, 0600), made on first use; with
``metrics.curve_clients_dir`` only subscribers whose public certificates are in that folder get in.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from bus import endpoints
from config import runtime
from config.schema import MetricsConfig

log = structlog.get_logger()


def server_keys(keys_dir: Path) -> tuple[bytes, bytes]:
    """(public, secret) of the server, made once in ``keys_dir``."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    secret_file = keys_dir / "server.key_secret"
    if not secret_file.exists():
        zmq.auth.create_certificates(str(keys_dir), "server")
        os.chmod(secret_file, 0o600)
    public, secret = zmq.auth.load_certificate(str(secret_file))
    assert secret is not None
    return public, secret


def keys_dir(cfg: MetricsConfig) -> Path:
    return Path(cfg.curve_keys_dir).expanduser() if cfg.curve_keys_dir else runtime.cache_root() / "metrics-curve"


BIND_TRIES = 60  # x 50 ms


def bind_when_free(sock: zmq.Socket, endpoint: str) -> None:  # type: ignore[type-arg]
    """Bind, waiting up to 3 s for the endpoint to be free: one just closed (the tcp endpoint opened again after a
    revocation, its steering socket) is let go in libzmq's reaper thread, a moment later; the bind came first 1
    time in 3 and the endpoint stayed shut."""
    for attempt in range(BIND_TRIES):
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != errno.EADDRINUSE or attempt == BIND_TRIES - 1:
                raise
            time.sleep(0.05)


def proxy_events(ctx: zmq.Context, attach: Callable[[zmq.Socket, zmq.Socket], bool],
                 ready: threading.Event, control: str = "") -> None:
    """Forward events XSUB -> XPUB (and subscriptions back) until the context ends (or, given a ``control``
    endpoint, until TERMINATE comes there); ``attach(xsub, xpub)`` binds or connects both (False: give up).
    ``ready`` is set once they are attached, or when giving up. Runs in a thread: the supervisor's own bus and the
    tcp endpoint are both one of these."""
    xsub = ctx.socket(zmq.XSUB)
    xpub = ctx.socket(zmq.XPUB)
    steer = ctx.socket(zmq.PAIR) if control else None
    try:
        if steer is not None:
            steer.linger = 0
            bind_when_free(steer, control)
        for s in (xsub, xpub):
            s.linger = 0
        xpub.sndhwm = 1000
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # (every subscription goes up: the supervisor replays the states)
        if not attach(xsub, xpub):
            return
        ready.set()
        if steer is not None:
            zmq.proxy_steerable(xsub, xpub, None, steer)
        else:
            zmq.proxy(xsub, xpub)
    except zmq.ContextTerminated:
        pass
    finally:
        ready.set()
        xsub.close(0)
        xpub.close(0)
        if steer is not None:
            steer.close(0)


STEER = "inproc://metrics-tcp-steer"


class TcpMetrics:
    def __init__(self, ctx: zmq.Context, run_dir: Path, host: str, cfg: MetricsConfig) -> None:  # type: ignore[type-arg]
        self.ctx, self.run_dir, self.host, self.cfg = ctx, run_dir, host, cfg
        self.auth: ThreadAuthenticator | None = None
        self.thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.clients: set[bytes] = set()  # the public keys let in (CurveZMQ with a clients folder)

    def start(self) -> None:
        if self.cfg.curve:
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.read_clients()
        self._start_proxy()

    def _start_proxy(self) -> None:
        self.ready.clear()
        self.thread = threading.Thread(target=self._run, name="metrics-tcp", daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def read_clients(self) -> str:
        """(Re)read the subscribers' certificates of ``curve_clients_dir`` (at `up` and at each reload: a
        certificate added later was refused until a restart). A certificate taken away cuts its subscriber off
        at once: the tcp endpoint is opened again (CurveZMQ checks a key at the handshake only: a subscriber let
        in went on receiving); the others reconnect by themselves. Returns what changed ("" for nothing)."""
        if self.auth is None:
            return ""
        folder = self.cfg.curve_clients_dir
        location = str(Path(folder).expanduser()) if folder else zmq.auth.CURVE_ALLOW_ANY
        self.auth.configure_curve(domain="*", location=location)
        if not folder:
            return ""
        try:
            now = set(zmq.auth.load_certificates(location))
        except OSError:
            now = set()
        added, removed, self.clients = now - self.clients, self.clients - now, now
        if removed and self.thread is not None:
            self._restart_proxy()
        return ", ".join(f"{n} metrics client certificate(s) {what}" for n, what in
                         ((len(added), "added"), (len(removed), "removed: cut off")) if n)

    def _restart_proxy(self) -> None:
        steer = self.ctx.socket(zmq.PAIR)
        steer.linger = 1000
        try:
            steer.connect(STEER)
            steer.send(b"TERMINATE")
            if self.thread is not None:
                self.thread.join(5)
        finally:
            steer.close()
        self._start_proxy()

    def _run(self) -> None:
        proxy_events(self.ctx, self._attach, self.ready, STEER)

    def _attach(self, xsub: zmq.Socket, xpub: zmq.Socket) -> bool:
        if self.cfg.curve:
            public, secret = server_keys(keys_dir(self.cfg))
            xpub.curve_server = True
            xpub.curve_publickey = public
            xpub.curve_secretkey = secret
        xsub.connect(endpoints.metrics(self.run_dir))
        try:
            bind_when_free(xpub, f"tcp://{self.host}:{self.cfg.tcp_port}")
        except zmq.ZMQError as exc:
            log.error("metrics_tcp_bind_failed", port=self.cfg.tcp_port, error=str(exc))
            return False
        log.info("metrics_tcp", host=self.host, port=self.cfg.tcp_port, curve=self.cfg.curve)
        return True

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
