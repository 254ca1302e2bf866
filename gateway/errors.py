"""Errors sent to clients in each protocol's own shape.

An :class:`ApiError` carries the HTTP status, a message, and who produced it: the proxy itself
(``source="proxy"``, e.g. a bad request or an unknown model) or the backend behind it
(``source="backend"``, e.g. llama-server refused the request). The body builders tag the message
with that source, so a user reading a client's error knows where to look.
"""

from __future__ import annotations

from typing import Any

import structlog

__all__ = ["ApiError", "log_failure", "ollama_error_body", "openai_error_body", "source_tag"]

log = structlog.get_logger()

_SOURCE_TAGS = {"proxy": "llama-runner", "backend": "backend"}


class ApiError(Exception):
    """An error to send to the client in the protocol's own shape."""

    status: int
    message: str
    code: str
    param: str | None
    source: str

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "",
        param: str | None = None,
        source: str = "proxy",
    ) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = str(message)
        self.code = code
        self.param = param
        self.source = source

    def __repr__(self) -> str:
        return (
            f"ApiError(status={self.status!r}, message={self.message!r}, code={self.code!r}, "
            f"param={self.param!r}, source={self.source!r})"
        )


class ContextOverflow(ApiError):
    """llama-server refused a prompt of ``prompt_tokens`` for its context of ``ctx`` tokens (0: not said)."""

    def __init__(self, status: int, message: str, prompt_tokens: int, ctx: int) -> None:
        super().__init__(status, message, code="context_length_exceeded", source="backend")  # (OpenAI's code)
        self.prompt_tokens, self.ctx = prompt_tokens, ctx


def log_failure(err: ApiError, **where: Any) -> None:
    """A server-side failure (5xx) is logged with what the client was told, and ``where`` (path, model, ...):
    the gateway's log then says which request failed and why (the clients' own mistakes, 4xx, are not)."""
    if err.status >= 500:
        log.warning("request_failed", status=err.status, code=err.code, source=err.source, message=err.message,
                    **where)


def source_tag(err: ApiError) -> str:
    """``"(llama-runner)"`` for the proxy's own errors, ``"(backend)"`` for the backend's."""
    return "(" + _SOURCE_TAGS.get(err.source, err.source or "llama-runner") + ")"


def _tagged_message(err: ApiError) -> str:
    tag = source_tag(err)
    message = err.message.rstrip()
    if message.endswith(tag):
        return message
    return f"{message} {tag}" if message else tag


def ollama_error_body(err: ApiError) -> dict[str, Any]:
    """Ollama's shape: ``{"error": "<message> (llama-runner|backend)"}``."""
    return {"error": _tagged_message(err)}


def openai_error_body(err: ApiError) -> dict[str, Any]:
    """OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

    ``type`` is ``invalid_request_error`` for 4xx and ``server_error`` otherwise; an unknown model is
    ``model_not_found``, as OpenAI reports it (an unknown path has no code, as in OpenAI's answer).
    """
    if 400 <= err.status < 500:
        kind = "invalid_request_error"
        code: str | None = err.code or ("model_not_found" if err.status == 404 and err.param == "model" else None)
        if code == "unknown_model":  # the supervisor's name for it
            code = "model_not_found"
    else:
        kind = "server_error"
        code = err.code or None
    return {"error": {"message": _tagged_message(err), "type": kind, "param": err.param, "code": code}}
