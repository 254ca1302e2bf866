"""Socket addresses and topic names. ipc endpoints live in a private (0700) run directory."""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from pathlib import Path
from urllib.parse import quote

CONTROL_SOCK = "control.sock"  # supervisor ROUTER: commands and replies
METRICS_IN_SOCK = "metrics-in.sock"  # supervisor XSUB: publishers connect here
METRICS_SOCK = "metrics.sock"  # supervisor XPUB: the public metrics bus, subscribers connect here
SUPERVISOR_PID = "supervisor.pid"
UNIX_PATH_MAX = 104  # sun_path is 108 bytes on Linux, 104 on macOS (with its terminating NUL)


@functools.cache  # (asked per request by the gateways' Host check)
def is_loopback(host: str) -> bool:
    """Is ``host`` (a listen address) this machine's loopback only?"""
    if host in ("localhost", "localhost.localdomain"):
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_run_dir() -> Path:
    """A short private directory (ipc paths are limited to ~100 bytes)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        return Path(base) / "llama-runner"
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"llama-runner-{uid}"


class RunDirError(Exception):
    """The run directory cannot be made private (another user owns it, or it is not a directory)."""


def prepare_run_dir(run_dir: Path) -> Path:
    """Create the run directory (0700) or check an existing one: it must be a directory owned by this user;
    wider permissions are narrowed to 0700. Anything else raises RunDirError: another user could otherwise
    reach the control socket or plant sockets of their own."""
    run_dir = run_dir.expanduser().resolve()
    try:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"run dir {run_dir} exists and is not a directory") from None
    if os.name == "nt":
        return run_dir
    st = os.stat(run_dir, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"run dir {run_dir} is not a directory")
    if st.st_uid != os.getuid():
        raise RunDirError(f"run dir {run_dir} belongs to another user (uid {st.st_uid}); pass --run-dir or set "
                          "run_dir to a directory of your own")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(run_dir, 0o700)
    return run_dir


def _ipc(run_dir: Path | str, name: str) -> str:
    return f"ipc://{Path(run_dir) / name}"


def control(run_dir: Path | str) -> str:
    return _ipc(run_dir, CONTROL_SOCK)


def metrics_in(run_dir: Path | str) -> str:
    return _ipc(run_dir, METRICS_IN_SOCK)


def metrics(run_dir: Path | str) -> str:
    return _ipc(run_dir, METRICS_SOCK)


def _hashed(name: str) -> str:
    """A model name as a short file name part: model names never become paths. FNV-1a, 64 bits: not hashlib,
    whose import loads OpenSSL (~3.4 MB resident) into the supervisor, which needs no other part of it."""
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def worker(run_dir: Path | str, name: str, pid: int) -> str:
    """The job ROUTER of worker process ``pid`` of model ``name``: an address of its own for every worker process,
    so that a job a gateway queued for a worker that died is never delivered to the one that replaces it (it was:
    the same address, and ZeroMQ sends what it holds when it reconnects; the request then ran twice)."""
    return _ipc(run_dir, f"w-{_hashed(name)}-{pid}.sock")


def worker_sockets(run_dir: Path | str, name: str) -> list[tuple[Path, int]]:
    """The job sockets of model ``name``'s worker processes in ``run_dir``, with their pids (a worker killed leaves
    its own behind: the next one removes those of processes gone)."""
    out = []
    for path in Path(run_dir).glob(f"w-{_hashed(name)}-*.sock"):
        pid = path.name.removesuffix(".sock").rpartition("-")[2]
        if pid.isdigit():
            out.append((path, int(pid)))
    return out
    return True


def llama_socket(run_dir: Path | str, name: str) -> str | None:
    """The unix socket a worker's llama-server listens on beside its TCP port (None: the path would be too long
    for a unix socket address, the worker then speaks TCP). Not a bus address: HTTP between a worker and its
    own llama-server, cheaper than TCP over loopback (no ACKs, fewer wakeups)."""
    path = str(Path(run_dir) / f"l-{_hashed(name)}.sock")
    return path if len(path.encode()) < UNIX_PATH_MAX else None


# --------------------------------------------------------------------------- topics
# Every topic ends with "/" so that "metrics/worker/a/" never prefix-matches "metrics/worker/ab/".
TOPIC_STATE = "state/"
TOPIC_METRICS = "metrics/"


def _part(name: str) -> str:
    return quote(name, safe="")


def topic_worker_state(name: str) -> str:
    return f"{TOPIC_STATE}worker/{_part(name)}/"


def topic_process_state(name: str) -> str:
    return f"{TOPIC_STATE}process/{_part(name)}/"


def topic_worker_metrics(name: str) -> str:
    return f"{TOPIC_METRICS}worker/{_part(name)}/"


def topic_system_metrics() -> str:
    return f"{TOPIC_METRICS}system/"


TOPIC_REQUEST = "request/"


def topic_gateway_metrics(protocol: str) -> str:
    return f"{TOPIC_METRICS}gateway/{_part(protocol)}/"


def topic_request(model: str) -> str:
    """Per-request events (queued, started, first token, finished) of one model."""
    return f"{TOPIC_REQUEST}{_part(model)}/"
