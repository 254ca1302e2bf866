"""Constraints llama-server must never be given: a JSON schema or a GBNF grammar asking for more repetitions at
least than at most (``minItems`` 5 with ``maxItems`` 2, ``x{5,2}``). llama.cpp's grammar builder never returns on
them and its memory grows by hundreds of MB a second until the machine runs out (a client's timeout does not stop
it); everything else in them llama-server checks itself (a 400). Checked on every job's body, where all the
protocols' schemas have arrived: ``response_format``, ``json_schema``, ``grammar``, tool parameters.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.errors import ApiError

__all__ = ["check_constraints"]

_PAIRS = (("minItems", "maxItems"), ("minLength", "maxLength"), ("minProperties", "maxProperties"),
          ("minContains", "maxContains"))
_REPEAT = re.compile(rb"\{\s*(\d+)\s*,\s*(\d+)\s*\}")
_MAX_NODES = 200_000


def check_constraints(body: dict[str, Any]) -> None:
    """400 for a schema or grammar in ``body`` that no value can match by its repetition bounds."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        spec = fmt.get("json_schema")
        _schema(spec.get("schema") if isinstance(spec, dict) else None, "response_format")
        _schema(fmt.get("schema"), "response_format")  # (llama.cpp's own shape)
    _schema(body.get("json_schema"), "json_schema")
    text = body.get("text")
    if isinstance(text, dict) and isinstance(text.get("format"), dict):
        _schema(text["format"].get("schema"), "text.format.schema")
    tools = body.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            if isinstance(tool, dict):
                fn = tool.get("function")
                _schema((fn if isinstance(fn, dict) else tool).get("parameters"), f"tools[{i}].parameters")
    grammar = body.get("grammar")
    if isinstance(grammar, str) and "{" in grammar:
        _grammar(grammar)


def _schema(schema: Any, param: str) -> None:
    if not isinstance(schema, dict | list):
        return
    stack, seen = [schema], 0
    while stack and seen < _MAX_NODES:
        node = stack.pop()
        seen += 1
        if isinstance(node, dict):
            for low, high in _PAIRS:
                a, b = node.get(low), node.get(high)
                if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and a > b:
                    raise ApiError(400, f"invalid JSON schema in {param}: {low} {a} is more than {high} {b} (no "
                                        "value can match)", param=param, code="invalid_json_schema")
            stack.extend(v for v in node.values() if isinstance(v, dict | list))
        else:
            stack.extend(v for v in node if isinstance(v, dict | list))


def _grammar(grammar: str) -> None:
    """Repetitions ``{m,n}`` outside quoted literals and character classes."""
    raw = _unquoted(grammar.encode())
    for m in _REPEAT.finditer(raw):
        low, high = int(m.group(1)), int(m.group(2))
        if low > high:
            raise ApiError(400, f"invalid grammar: the repetition {{{low},{high}}} asks for more at least than at "
                                "most", param="grammar", code="invalid_grammar")


def _unquoted(text: bytes) -> bytes:
    """``text`` with its "..." literals and [...] classes blanked (escapes within them kept inside)."""
    out = bytearray(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in b'"[':
            end = ord('"') if c == ord('"') else ord("]")
            j = i + 1
            while j < n and text[j] != end:
                j += 2 if text[j] == ord("\\") else 1
            out[i:min(j + 1, n)] = b" " * (min(j + 1, n) - i)
            i = j + 1
        elif c == ord("#"):  # a comment, to the end of its line
            j = text.find(b"\n", i)
            j = n if j < 0 else j
            out[i:j] = b" " * (j - i)
            i = j
        else:
            i += 1
    return bytes(out)
