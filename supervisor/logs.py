"""structlog setup: one JSON-lines file per process under the logs dir, readable console in the foreground."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import structlog


def _no_request_bytes(record: logging.LogRecord) -> bool:
    """aiohttp's own errors about a request it could not parse carry the request's bytes (a prompt, a key) in
    their exception: the log keeps the exception's type only (the client had its 400)."""
    if record.exc_info and record.exc_info[1] is not None:
        record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


def setup_logging(process: str, logs_dir: Path | str, *, level: str = "info", console: bool = False) -> None:
    logs = Path(logs_dir)
    logs.mkdir(parents=True, exist_ok=True)
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    file_handler = logging.FileHandler(logs / f"{process}.log", encoding="utf-8")
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
