"""The Responses API's stored responses (``store``, on by default): what ``previous_response_id`` continues from
and what ``GET``/``DELETE /v1/responses/{id}`` read, as OpenAI and LM Studio keep them (llama-server keeps none:
it refused ``previous_response_id``).

Kept in this gateway's memory only: a restart forgets them, and each port keeps its own. The newest
``MAX_ENTRIES`` are kept, each for ``TTL_S`` from its last use, and at most ``MAX_BYTES`` of them in all; a
response dropped for that is "not found" (a 400 for ``previous_response_id``, OpenAI's answer for an unknown id).
Entries are kept encoded: a client's later change to a list cannot reach a stored one, and the size is exact.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, NamedTuple

import msgspec

from gateway.errors import ApiError

__all__ = ["MAX_BYTES", "MAX_ENTRIES", "ResponseStore", "TTL_S", "input_items"]

MAX_ENTRIES = 512
TTL_S = 6 * 3600.0
MAX_BYTES = 64 << 20

_enc = msgspec.json.Encoder()


class _Entry(NamedTuple):
    conversation: bytes  # the input items the response answered, then its output items (JSON list)
    response: bytes  # the response object as it was answered (JSON)
    used: float


def input_items(value: Any) -> list[Any]:
    """A request's ``input`` as a list of items (a string is one user message)."""
    return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else list(value)


class ResponseStore:
    def __init__(self, max_entries: int = MAX_ENTRIES, ttl_s: float = TTL_S, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries, self.ttl_s, self.max_bytes = max_entries, ttl_s, max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, conversation: list[Any], response: dict[str, Any]) -> None:
        entry = _Entry(_enc.encode(conversation), _enc.encode(response), time.monotonic())
        self._drop(response_id)
        if len(entry.conversation) + len(entry.response) > self.max_bytes:
            return  # (more than the whole store: not kept, and nothing else dropped for it)
        self._entries[response_id] = entry
        self._bytes += len(entry.conversation) + len(entry.response)
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

    def delete(self, response_id: str) -> None:
        self._find(response_id, None)
        self._drop(response_id)

    def _drop(self, response_id: str) -> None:
        old = self._entries.pop(response_id, None)
        if old is not None:
            self._bytes -= len(old.conversation) + len(old.response)

    def _trim(self) -> None:
        too_old = time.monotonic() - self.ttl_s
        while self._entries:
            oldest_id, oldest = next(iter(self._entries.items()))
            if len(self._entries) <= self.max_entries and self._bytes <= self.max_bytes and oldest.used >= too_old:
                break
            self._drop(oldest_id)
