"""The Responses API's stored responses (``store``, on by default): what ``previous_response_id`` continues from
and what ``GET``/``DELETE /v1/responses/{id}`` read, as OpenAI and LM Studio keep them (llama-server keeps none:
it refused ``previous_response_id``).

Kept in this gateway's memory only: a restart forgets them, and each port keeps its own. The newest
``MAX_ENTRIES`` are kept, each for ``TTL_S`` from its last use, and at most ``MAX_BYTES`` of them in all; a
response dropped for that is "not found" (a 400 for ``previous_response_id``, OpenAI's answer for an unknown id).
Entries are kept encoded: a client's later change to a list cannot reach a stored one, and the size is exact.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from gateway.errors import ApiError

__all__ = ["MAX_BYTES", "MAX_ENTRIES", "ResponseStore", "TTL_S", "input_items", "listed_items"]

MAX_ENTRIES = 512
TTL_S = 6 * 3600.0
MAX_BYTES = 64 << 20

_enc = msgspec.json.Encoder()


class _Entry(NamedTuple):
    conversation: bytes  # the input items the response answered, then its output items (JSON list)
    response: bytes  # the response object as it was answered (JSON)
    used: float
    inputs: bytes = b"[]"  # the request's own input items, as /input_items lists them (JSON list)

    @property
    def size(self) -> int:
        return len(self.conversation) + len(self.response) + len(self.inputs)


def input_items(value: Any) -> list[Any]:
    """A request's ``input`` as a list of items (a string is one user message)."""
    return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else list(value)


def listed_items(items: list[Any]) -> list[Any]:
    """A request's input items as OpenAI lists them (``GET /v1/responses/{id}/input_items``): each with an ``id``
    (given once, at storing), a message's text content as ``input_text`` parts, and a ``status``."""
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        item = dict(item)
        kind = item.setdefault("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, str):
                part = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": part, "text": content}]
            item.setdefault("status", "completed")
        item.setdefault("id", f"{'msg' if kind == 'message' else 'item'}_{secrets.token_hex(24)}")
        out.append(item)
    return out


def _page(items: list[Any], query: Mapping[str, str]) -> dict[str, Any]:
    """OpenAI's cursor page of ``items``: ``order`` (``desc``, the default, or ``asc``), ``limit`` (1-100, 20),
    ``after`` / ``before`` (an item's id)."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, f"Invalid value for 'order': expected 'asc' or 'desc', got {order!r}.", param="order")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise ApiError(400, "Invalid value for 'limit': expected an integer from 1 to 100.", param="limit")
    ordered = items if order == "asc" else items[::-1]
    ids = [item.get("id") for item in ordered]
    start, end = 0, len(ordered)
    for param in ("after", "before"):
        cursor = query.get(param)
        if cursor is None:
            continue
        if cursor not in ids:
            raise ApiError(404, f"Item with id '{cursor}' not found.", param=param, code="not_found")
        if param == "after":
            start = ids.index(cursor) + 1
        else:
            end = ids.index(cursor)
    window = ordered[start:end]
    data = window[:limit] if "before" not in query or "after" in query else window[-limit:]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(data) < len(window)}


class ResponseStore:
    def __init__(self, max_entries: int = MAX_ENTRIES, ttl_s: float = TTL_S, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries, self.ttl_s, self.max_bytes = max_entries, ttl_s, max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, conversation: list[Any], response: dict[str, Any],
            inputs: list[Any] | None = None) -> None:
        """Keep a response: ``conversation`` (what a ``previous_response_id`` continues), the response object, and
        ``inputs``, the request's own input items (what ``/input_items`` lists)."""
        entry = _Entry(_enc.encode(conversation), _enc.encode(response), time.monotonic(),
                       _enc.encode(listed_items(inputs or [])))
        self._drop(response_id)
        if entry.size > self.max_bytes:
            return  # (more than the whole store: not kept, and nothing else dropped for it)
        self._entries[response_id] = entry
        self._bytes += entry.size
        self._trim()

    def _find(self, response_id: Any, param: str | None) -> _Entry:
        self._trim()
        entry = self._entries.get(response_id) if isinstance(response_id, str) else None
        if entry is None:
            if param:
                raise ApiError(400, f"Previous response with id '{response_id}' not found.", param=param,
                               code="previous_response_not_found")
            raise ApiError(404, f"Response with id '{response_id}' not found.", code="not_found")
        self._entries[response_id] = entry._replace(used=time.monotonic())
        self._entries.move_to_end(response_id)
        return entry

    def conversation(self, response_id: Any, param: str = "previous_response_id") -> list[Any]:
        """The items to put before a request's own input that continues ``response_id`` (400 if unknown)."""
        if not isinstance(response_id, str) or not response_id:
            raise ApiError(400, f"Invalid type for '{param}': expected a response id (a string).", param=param)
        items: list[Any] = msgspec.json.decode(self._find(response_id, param).conversation)
        return items

    def response(self, response_id: str) -> dict[str, Any]:
        """The stored response object (404 if unknown)."""
        doc: dict[str, Any] = msgspec.json.decode(self._find(response_id, None).response)
        return doc

    def input_items(self, response_id: str, query: Mapping[str, str]) -> dict[str, Any]:
        """``GET /v1/responses/{id}/input_items``: a page of the request's input items (404 if unknown)."""
        items: list[Any] = msgspec.json.decode(self._find(response_id, None).inputs)
        return _page(items, query)

    def delete(self, response_id: str) -> None:
        self._find(response_id, None)
        self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        old = self._entries.pop(response_id, None)
        if old is not None:
            self._bytes -= old.size

    def _trim(self) -> None:
        too_old = time.monotonic() - self.ttl_s
        while self._entries:
            oldest_id, oldest = next(iter(self._entries.items()))
            if len(self._entries) <= self.max_entries and self._bytes <= self.max_bytes and oldest.used >= too_old:
                break
            self._drop(oldest_id)
