"""The `llama-runner` command: `up` runs an instance; status/start/stop/restart/shutdown talk to one."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec

from bus import endpoints
from bus.control_client import ControlClient, ControlTimeout, new_id
from bus.protocol import (
    Command,
    ErrorReply,
    Reload,
    RestartWorker,
    Shutdown,
    StartWorker,
    Status,
    StatusReply,
    StopWorker,
)
from config.loader import Config, ConfigError, load_config


def _port(text: str) -> int:
    """A TCP port (1-65535): 89071 listened on 23535 (wrapped), -1 was retried for ever."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


def _positive(kind: type[int] | type[float], zero: bool = False) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'more than 0'}, not {text}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-runner", description="Local model runner and proxy.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run llama-runner in the foreground")
    up.add_argument("--config-dir", help="folder holding app_config.json and models_config.json")
    up.add_argument("--ollama-port", type=_port)
    up.add_argument("--lmstudio-port", type=_port)
    up.add_argument("--dashboard-port", type=_port)
    up.add_argument("--run-dir", help="private folder for the bus sockets (one per instance)")
    up.add_argument("--logs-dir")
    for name, help_ in (("status", "show the state of every worker and process"),
                        ("start", "start a model's worker"), ("stop", "stop a model's worker"),
                        ("restart", "restart a model's worker (others are untouched)"),
                        ("reload", "re-read the config: restart only changed workers (also: SIGHUP)"),
                        ("shutdown", "stop a running instance")):
        sp = sub.add_parser(name, help=help_)
        if name in ("start", "stop", "restart"):
            sp.add_argument("name", help="model name")
        sp.add_argument("--config-dir")
        sp.add_argument("--run-dir")
        sp.add_argument("--json", action="store_true", help="print the raw reply as JSON")
        sp.add_argument("--timeout", type=_positive(float), default=30.0)
    disc = sub.add_parser("discover", help="add the models found under the models root to models_config.json")
    disc.add_argument("--config-dir")
    disc.add_argument("--models-root", help="folder to scan (default: models_root of app_config.json)")
    disc.add_argument("--dry-run", action="store_true", help="only print what would be added")
    met = sub.add_parser("metrics", help="print the metrics bus (state, metrics and request events) as JSON lines")
    met.add_argument("--topic", action="append", default=[],
                     help="topic prefix to follow, e.g. metrics/worker/ or request/smollm2/ (repeatable; "
                     "default: everything)")
    met.add_argument("--count", type=_positive(int, zero=True), default=0,
                     help="exit after N events (default, 0: run until Ctrl-C)")
    met.add_argument("--with-topic", action="store_true", help='print {"topic": ..., "event": ...} per line')
    met.add_argument("--config-dir")
    met.add_argument("--run-dir")
    return p


def _metrics(args: argparse.Namespace) -> int:
    """Subscribe to the metrics bus and print every event as one JSON line (flushed as it comes)."""
    import zmq

    run_dir = _running_instance(args, endpoints.METRICS_SOCK)
    if run_dir is None:
        return 1
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(endpoints.metrics(run_dir))
    for prefix in args.topic or [""]:
        sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    seen = 0
    try:
        while not args.count or seen < args.count:
            frames = sub.recv_multipart()
            if len(frames) != 2:
                continue
            if args.with_topic:
                line = b'{"topic": ' + json.dumps(frames[0].decode("utf-8", "replace")).encode() + b', "event": ' \
                    + frames[1] + b"}"
            else:
                line = frames[1]
            sys.stdout.buffer.write(line + b"\n")
            sys.stdout.flush()
            seen += 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # e.g. piped into head
        pass
    finally:
        sub.close(0)
        ctx.term()
    return 0


def _discover(args: argparse.Namespace) -> int:
    from config.loader import MODELS_FILE
    from supervisor.discovery import discover

    config = _load(args)
    root = Path(args.models_root) if args.models_root else config.models_root
    if not root.expanduser().is_dir():
        print(f"llama-runner: the models root {root} is not a directory (--models-root, or models_root in "
              "app_config.json)", file=sys.stderr)
        return 1
    added = discover(config.config_dir / MODELS_FILE, root, config_root=config.models_root, write=not args.dry_run)
    for f in added:
        print(f"{'would add' if args.dry_run else 'added'} {f.kind} model {f.name!r}: {f.path}")
    if not added:
        print(f"no new models under {root}")
    elif not args.dry_run:
        try:
            load_config(config.config_dir)
        except ConfigError as exc:  # never leave a config behind that `up` refuses
            print(f"llama-runner: the updated config does not load: {exc}", file=sys.stderr)
            return 1
        print("run `llama-runner reload` to serve them")
    return 0


def _run_dir(args: argparse.Namespace, config: Config | None) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    if config is not None and config.app.run_dir:
        return Path(config.app.run_dir)
    return endpoints.default_run_dir()


def _load(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config_dir)
    except ConfigError as exc:
        print(f"llama-runner: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _command(args)
    except BrokenPipeError:  # (`llama-runner status | head`: the reader is gone, nothing more to say)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _command(args: argparse.Namespace) -> int:
    if args.command == "up":
        return _up(args)
    if args.command == "discover":
        return _discover(args)
    if args.command == "metrics":
        return _metrics(args)
    return _client(args)


def _up(args: argparse.Namespace) -> int:
    from supervisor.logs import log_limits, setup_logging
    from supervisor.main import Supervisor

    config = _load(args)
    app = config.app
    import socket

    try:  # (a host that names nothing was retried for ever, "in use by another program?")
        socket.getaddrinfo(app.host, None)
    except (socket.gaierror, UnicodeError) as exc:
        print(f"llama-runner: config error: host {app.host!r} in app_config.json is not an address of this machine "
              f"({exc})", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {}
    proxies = app.proxies
    if args.ollama_port is not None:
        proxies = msgspec.structs.replace(proxies, ollama=msgspec.structs.replace(proxies.ollama, port=args.ollama_port))
    if args.lmstudio_port is not None:
        proxies = msgspec.structs.replace(proxies, lmstudio=msgspec.structs.replace(proxies.lmstudio,
                                                                                   port=args.lmstudio_port))
    overrides["proxies"] = proxies
    if args.dashboard_port is not None:
        overrides["dashboard"] = msgspec.structs.replace(app.dashboard, port=args.dashboard_port)
    if args.logs_dir:
        overrides["logs_dir"] = args.logs_dir
    config = Config(app=msgspec.structs.replace(app, **overrides), models=config.models, config_dir=config.config_dir)
    try:
        run_dir = endpoints.prepare_run_dir(_run_dir(args, config))
    except endpoints.RunDirError as exc:
        print(f"llama-runner: {exc}", file=sys.stderr)
        return 1
    pid_file = run_dir / endpoints.SUPERVISOR_PID
    if pid_file.exists():
        try:
            other = int(pid_file.read_text().strip())
            os.kill(other, 0)
            print(f"llama-runner: another instance (pid {other}) uses run dir {run_dir}; "
                  "stop it or pass --run-dir", file=sys.stderr)
            return 1
        except (ValueError, ProcessLookupError, PermissionError):
            pid_file.unlink(missing_ok=True)
    logs_dir = config.logs_dir()
    setup_logging("supervisor", logs_dir, level=config.app.log_level, console=True, limits=log_limits(config.app))
    from config import runtime

    if runtime.find_llama_server(config.app.llama_server_path) is None:
        print("llama-runner: warning: no llama-server found (set LLAMA_SERVER or llama_server_path, or run "
              "`make setup`); models will fail to load", file=sys.stderr)
    host = config.app.host
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"llama-runner: warning: listening on {host}, beyond this machine: anyone who reaches it can use "
              "the models (set API keys, and the dashboard token, in the config)", file=sys.stderr)
    elif ((config.app.proxies.ollama.api_keys or config.app.proxies.lmstudio.api_keys) and config.app.dashboard.enabled
          and not config.app.dashboard.token):
        print("llama-runner: warning: the API ports want keys, but the dashboard's actions (start, stop, reload, "
              "discover) are open to every local user: set dashboard.token in app_config.json", file=sys.stderr)
    print(f"llama-runner: ollama API on http://{host}:{config.app.proxies.ollama.port}, "
          f"OpenAI/LM Studio API on http://{host}:{config.app.proxies.lmstudio.port}/v1, "
          f"dashboard on http://{host}:{config.app.dashboard.port}, run dir {run_dir}, logs {logs_dir}",
          file=sys.stderr, flush=True)
    _dashboard_token(config)

    async def _main() -> int:
        sup = Supervisor(config, run_dir, logs_dir)
        from supervisor.child import install_stop_signals

        install_stop_signals(sup.request_stop)
        with contextlib.suppress(AttributeError, NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, sup.request_reload)
        return await sup.run()

    # Plain asyncio: the supervisor is off the request path (leases are shared and long-lived), and uvloop
    # would bring ssl into its process (see supervisor/lean.py).
    return asyncio.run(_main())


def _dashboard_token(config: Config) -> None:
    """Beyond 127.0.0.1 the dashboard's actions need a token: the configured one, else one made for this run
    (handed to the dashboard through the environment). Printed so the operator can use it."""
    from dashboard.auth import ENV_TOKEN, dashboard_token, is_loopback

    dash = config.app.dashboard
    if not dash.enabled or is_loopback(config.app.host):
        return
    token = dashboard_token(config.app.host, dash.token)
    if token and not dash.token:
        os.environ[ENV_TOKEN] = token
    print(f"llama-runner: dashboard token (needed for its actions): {token}", file=sys.stderr, flush=True)


def _running_instance(args: argparse.Namespace, sock: str) -> Path | None:
    """The run dir of the instance a client command talks to (None, after saying so, when none runs there)."""
    config = None
    broken = ""
    if args.config_dir or not args.run_dir:
        try:
            config = load_config(args.config_dir)
        except ConfigError as exc:  # (a reload's very reason, often: the run dir is read from the file as it is)
            broken = str(exc)
    run_dir = _run_dir(args, config)
    if broken and not args.run_dir:
        run_dir = _raw_run_dir(args.config_dir) or run_dir
    if not (run_dir / sock).exists() or not _supervisor_alive(run_dir) or not _listening(run_dir / sock):
        print(f"llama-runner: no running instance in {run_dir} (start one with `llama-runner up`)", file=sys.stderr)
        if broken:
            print(f"llama-runner: and the config does not load: {broken}", file=sys.stderr)
        return None
    return run_dir


def _raw_run_dir(config_dir: str | None) -> Path | None:
    """``run_dir`` of an app_config.json that does not load as a whole, if it can be read at all."""
    from config.loader import APP_FILE, DEFAULT_CONFIG_DIR

    try:
        doc = json.loads((Path(config_dir).expanduser() if config_dir else DEFAULT_CONFIG_DIR).joinpath(APP_FILE)
                         .read_text())
    except (OSError, ValueError):
        return None
    value = doc.get("run_dir") if isinstance(doc, dict) else None
    return Path(value).expanduser() if isinstance(value, str) and value else None


def _listening(path: Path) -> bool:
    """Does anybody listen on the unix socket ``path``? (A supervisor gone without a pid file left it behind: a
    client waited 30 s for an answer.)"""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # (unsure: ask, and time out if need be)
    return True


def _supervisor_alive(run_dir: Path) -> bool:
    """Is the supervisor of ``run_dir`` running? (A supervisor killed -9 leaves its files behind: a client then
    waited for an answer that never comes.) Unknown (no pid file): assumed so."""
    from supervisor.child import pid_alive

    try:
        pid = int((run_dir / endpoints.SUPERVISOR_PID).read_text().strip())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return pid_alive(pid)


def _client(args: argparse.Namespace) -> int:
    run_dir = _running_instance(args, endpoints.CONTROL_SOCK)
    if run_dir is None:
        return 1
    rid = new_id()
    cmd: Command = {  # type: ignore[assignment]
        "status": lambda: Status(request_id=rid),
        "start": lambda: StartWorker(request_id=rid, name=args.name),
        "stop": lambda: StopWorker(request_id=rid, name=args.name),
        "restart": lambda: RestartWorker(request_id=rid, name=args.name),
        "shutdown": lambda: Shutdown(request_id=rid),
        "reload": lambda: Reload(request_id=rid),
    }[args.command]()

    async def _ask() -> object:
        client = ControlClient(run_dir)
        try:
            return await client.request(cmd, args.timeout)
        finally:
            await client.close()

    try:
        reply = asyncio.run(_ask())
    except ControlTimeout as exc:
        print(f"llama-runner: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(msgspec.to_builtins(reply), indent=2))
    elif isinstance(reply, StatusReply):
        print(f"supervisor pid {reply.pid}")
        for w in reply.workers:
            extra = f"  {w.message}" if w.message else ""
            print(f"  model {w.name:<24} {w.state.value:<9} pid {w.pid or '-':<8} restarts {w.restarts}{extra}")
        for p in reply.processes:
            print(f"  {p.name:<30} {p.state:<9} pid {p.pid or '-':<8} restarts {p.restarts} port {p.port}")
    elif isinstance(reply, ErrorReply):
        print(f"llama-runner: {reply.message}", file=sys.stderr)
    else:
        print(getattr(reply, "message", "") or "ok")
    return 1 if isinstance(reply, ErrorReply) else 0


if __name__ == "__main__":
    sys.exit(main())
