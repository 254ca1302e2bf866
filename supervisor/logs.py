"""structlog setup: one JSON-lines file per process under the logs dir, readable console in the foreground."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Any

import structlog

from bus.protocol import LogLimits
from config.schema import AppConfig


def log_limits(app: AppConfig) -> LogLimits:
    return LogLimits(max_bytes=app.log_max_bytes, backups=app.log_backups)


class RotatingFile:
    """An append-only log file of raw bytes (llama-server's output), rotated as logging's RotatingFileHandler
    rotates: past ``limits.max_bytes``, ``name`` becomes ``name.1`` (``name.1`` becomes ``name.2``...; the
    oldest beyond ``limits.backups`` is dropped) and a new ``name`` is started. Writes whole lines only."""

    def __init__(self, path: Path, limits: LogLimits) -> None:
        self.path, self.limits = path, limits
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 (closed by close())
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        if self._size and self._size + len(data) > self.limits.max_bytes:
            self._rotate()
        self._file.write(data)
        self._size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.limits.backups - 1, 0, -1):
            older = f"{self.path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RotatingFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _no_request_bytes(record: logging.LogRecord) -> bool:
    """aiohttp's own errors about a request it could not parse carry the request's bytes (a prompt, a key) in
    their exception: the log keeps the exception's type only (the client had its 400)."""
    if record.exc_info and record.exc_info[1] is not None:
        record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


def setup_logging(process: str, logs_dir: Path | str, *, level: str = "info", console: bool = False,
                  limits: LogLimits | None = None) -> None:
    limits = limits or LogLimits()
    logs = Path(logs_dir)
    logs.mkdir(parents=True, exist_ok=True)
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    file_handler = logging.handlers.RotatingFileHandler(
        logs / f"{process}.log", maxBytes=limits.max_bytes, backupCount=limits.backups, encoding="utf-8")
    file_handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
            foreign_pre_chain=shared,
        )
    )
    handlers: list[logging.Handler] = [file_handler]
    if console:
        console_handler = logging.StreamHandler(sys.stderr)
        console_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processor=structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
                foreign_pre_chain=shared,
            )
        )
        handlers.append(console_handler)
    root = logging.getLogger()
    root.handlers = handlers
    root.setLevel(lvl)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_no_request_bytes)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process)
