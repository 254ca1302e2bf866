"""What one JSON request may ask for, whatever its route: ``limits.max_messages`` messages and
``limits.max_prompt_chars`` characters of text to process (413 beyond either). Pure functions.

Counted: ``messages`` (each message's ``content`` as a string or a list of ``{"text"}`` parts), ``prompt``,
``system``, ``suffix`` (Ollama, OpenAI completions) and ``input`` (embeddings) as a string or a list of strings.
Token lists and values of the wrong type are not counted: the translators refuse those with their own 400.
"""

from __future__ import annotations

from typing import Any

from config.schema import LimitsConfig
from gateway.errors import ApiError

__all__ = ["check", "prompt_chars"]

TEXT_FIELDS = ("prompt", "system", "suffix", "input")


def _text(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        n = 0
        for item in value:
            if isinstance(item, str):
                n += len(item)
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                n += len(item["text"])
        return n
    return 0


def prompt_chars(req: dict[str, Any]) -> int:
    """Characters of text ``req`` asks the model to read."""
    n = sum(_text(req.get(key)) for key in TEXT_FIELDS)
    messages = req.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                n += _text(m.get("content"))
    return n


def check(req: dict[str, Any], limits: LimitsConfig) -> None:
    """ApiError(413) if ``req`` has too many messages or too much text."""
    messages = req.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise ApiError(413, f"too many messages: {len(messages)}, the limit is {limits.max_messages} "
                       "(limits.max_messages)", code="too_many_messages", param="messages")
    chars = prompt_chars(req)
    if chars > limits.max_prompt_chars:
        param = "messages" if isinstance(messages, list) else next((k for k in TEXT_FIELDS if k in req), None)
        raise ApiError(413, f"prompt too long: {chars} characters, the limit is {limits.max_prompt_chars} "
                       "(limits.max_prompt_chars)", code="prompt_too_long", param=param)
