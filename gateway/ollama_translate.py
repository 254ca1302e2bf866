"""Ollama's ``/api/chat`` and ``/api/generate`` ⇄ llama-server's OpenAI-compatible endpoints.

Pure functions and one small stateful class, no I/O:

* requests: :func:`chat_to_backend` and :func:`generate_to_backend` validate an Ollama request body
  and build the llama-server request (:class:`BackendRequest`); :func:`parse_keep_alive` reads
  ``keep_alive``; :func:`is_load_only` spots the "just load / unload the model" requests;
* responses: :class:`OllamaStream` turns llama-server's streamed chunks into Ollama's NDJSON objects,
  :func:`chat_response` / :func:`generate_response` do the same for a non-streamed reply, and
  :func:`load_response` answers a load-only request.

Every duration in an Ollama reply is in nanoseconds, taken from llama-server's ``timings``
(milliseconds). Invalid input raises :class:`~gateway.errors.ApiError` (400, naming the field) and
nothing else; an error reported by the backend raises ``ApiError(source="backend")``.
"""

from __future__ import annotations

import math
import operator
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from gateway.errors import ApiError
from gateway.sse import SSEParser

__all__ = [
    "BackendRequest",
    "OllamaStream",
    "chat_response",
    "chat_to_backend",
    "created_at",
    "done_reason",
    "error_from_backend",
    "generate_response",
    "generate_to_backend",
    "is_load_only",
    "load_response",
    "map_options",
    "metrics",
    "ollama_tool_call",
    "parse_keep_alive",
]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


@dataclass(frozen=True)
class BackendRequest:
    """A request for llama-server: ``POST path`` with the JSON ``body``; ``stream`` says if it is SSE."""

    path: str
    body: dict[str, Any]
    stream: bool
    media: str = ""  # the kind of a media content part it carries ("image_url"...): the model must take it


# ---------------------------------------------------------------------------------------------
# keep_alive


_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_UNIT = r"(?:ns|us|µs|μs|ms|s|m|h)"
_GO_DURATION = re.compile(rf"(?:{_NUMBER}{_UNIT})+")
_GO_DURATION_PART = re.compile(rf"({_NUMBER})({_UNIT})")
_PLAIN_NUMBER = re.compile(rf"[+-]?{_NUMBER}(?:[eE][+-]?\d+)?")
_MAX_SECONDS = (2**63 - 1) / 1e9  # Go's time.Duration range: anything longer is "forever" anyway


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's ``keep_alive``: seconds to keep the model loaded after this request.

    Accepts a number of seconds or a Go duration string (``"5m"``, ``"1h30m"``, ``"10s"``, ``"0"``,
    ``"-1"``); ``0`` means unload now, any negative value means keep forever and returns ``-1.0``.
    ``None`` (absent) and ``""`` return ``None``. Anything else raises ``ApiError(400)``.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _keep_alive_error(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if len(text) > 64:
            raise _keep_alive_error(value[:64] + "...")
        if _PLAIN_NUMBER.fullmatch(text):
            seconds = float(text)
        else:
            sign = -1.0 if text[0] == "-" else 1.0
            body = text[1:] if text[0] in "+-" else text
            if not _GO_DURATION.fullmatch(body):
                raise _keep_alive_error(value)
            seconds = sign * sum(
                float(num) * _UNIT_SECONDS[unit] for num, unit in _GO_DURATION_PART.findall(body)
            )
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float: forever, or a negative: forever too
            return -1.0
    if math.isnan(seconds):
        raise _keep_alive_error(value)
    if seconds < 0 or seconds > _MAX_SECONDS:
        return -1.0
    return seconds + 0.0  # no -0.0


def _keep_alive_error(value: Any) -> ApiError:
    shown = value if isinstance(value, str) else type(value).__name__
    return ApiError(
        400,
        f'invalid keep_alive {shown!r}: use seconds or a duration such as "5m", "1h30m", "0" or "-1"',
        param="keep_alive",
    )


# ---------------------------------------------------------------------------------------------
# requests


def is_load_only(req: Any, kind: str) -> bool:
    """True for a request that only loads (or, with ``keep_alive: 0``, unloads) the model:
    no messages for ``/api/chat``, an empty or missing prompt for ``/api/generate``."""
    if kind not in ("chat", "generate"):
        raise ValueError(f"kind must be 'chat' or 'generate', not {kind!r}")
    if not isinstance(req, dict):
        return False
    if kind == "chat":
        messages = req.get("messages")
        return messages is None or (isinstance(messages, list) and not messages)
    prompt = req.get("prompt")
    return prompt is None or prompt == ""


def chat_to_backend(req: Any) -> BackendRequest:
    """Ollama ``/api/chat`` body -> llama-server ``POST /v1/chat/completions``."""
    req = _require_object(req)
    model = _model(req)
    messages = req.get("messages")
    if messages is None:
        messages = []
    if not isinstance(messages, list):
        raise _bad("messages", "must be a list of messages")
    converted = [_message(m, i) for i, m in enumerate(messages)]
    body: dict[str, Any] = {"model": model, "messages": converted}
    stream = _common(req, body, tools=True)
    return BackendRequest(CHAT_PATH, body, stream)


def generate_to_backend(req: Any) -> BackendRequest:
    """Ollama ``/api/generate`` body -> ``POST /v1/completions`` (``raw``) or ``/v1/chat/completions``.

    Not raw: the prompt becomes a user message after the optional ``system`` message, so the model's
    own chat template applies, as Ollama does. ``suffix``, ``template`` and ``context`` are ignored (raw mode
    refuses the last three, as Ollama does: its prompt is the whole of what the model reads).
    """
    req = _require_object(req)
    model = _model(req)
    prompt = _opt_str(req, "prompt")
    system = _opt_str(req, "system")
    raw = req.get("raw")
    if raw is not None and not isinstance(raw, bool):
        raise _bad("raw", "must be a boolean")
    _refuse_images(req.get("images"), "images")
    for field in ("suffix", "template"):
        _opt_str(req, field)
    if raw and (system or req.get("template") or req.get("context")):
        raise ApiError(400, "raw mode does not support template, system, or context", param="raw")  # (Ollama's)
    if raw:
        body: dict[str, Any] = {"model": model, "prompt": prompt}
        stream = _common(req, body, tools=False)
        # /v1/completions reads a grammar from "json_schema", not from "response_format".
        response_format = body.pop("response_format", None)
        if response_format is not None:
            schema = response_format.get("json_schema", {}).get("schema", {"type": "object"})
            body["json_schema"] = schema
        return BackendRequest(COMPLETIONS_PATH, body, stream)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    body = {"model": model, "messages": messages}
    stream = _common(req, body, tools=False)
    return BackendRequest(CHAT_PATH, body, stream)


def _common(req: dict[str, Any], body: dict[str, Any], *, tools: bool) -> bool:
    """The fields /api/chat and /api/generate share: stream, options, format, tools, keep_alive."""
    stream = req.get("stream")
    if stream is None:
        stream = True  # Ollama streams unless told otherwise
    elif not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    parse_keep_alive(req.get("keep_alive"))  # validated here; the gateway reads it for the scheduler
    think = thinking_asked(req)
    if think is not None:
        body["chat_template_kwargs"] = thinking_kwargs(think)
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(map_options(req.get("options")))
    response_format = _format(req.get("format"))
    if response_format is not None:
        body["response_format"] = response_format
    if tools:
        tool_list = req.get("tools")
        if tool_list is not None:
            if not isinstance(tool_list, list) or not all(isinstance(t, dict) for t in tool_list):
                raise _bad("tools", "must be a list of tool objects")
            if tool_list:
                body["tools"] = [_tool(t, i) for i, t in enumerate(tool_list)]
    return stream


def drop_oldest(messages: list[dict[str, Any]], prompt_tokens: int, ctx: int) -> list[dict[str, Any]] | None:
    """A chat too long for the model's context, shortened as Ollama does (``truncate``, its default): system
    messages and the latest message stay, the oldest others go until the prompt should take at most 90% of the
    context (estimated by their share of the text; the caller tries again). None: nothing left to drop."""
    droppable = [i for i, m in enumerate(messages[:-1]) if m.get("role") != "system"]
    if not droppable or ctx <= 0 or prompt_tokens <= 0:
        return None

    def size(m: dict[str, Any]) -> int:
        return len(str(m.get("content") or "")) + len(str(m.get("tool_calls") or "")) + 16

    share = min(1.0, max(prompt_tokens - 0.9 * ctx, 1) / prompt_tokens)
    goal, dropped, gone = share * sum(size(m) for m in messages), 0, set()
    for i in droppable:
        gone.add(i)
        dropped += size(messages[i])
        if dropped >= goal:
            break
    return [m for i, m in enumerate(messages) if i not in gone]


def cut_front(text: str, prompt_tokens: int, ctx: int, others: int = 0) -> str | None:
    """``text`` (the latest message, or a raw prompt) without its beginning, so that the prompt should take at
    most 90% of the context, as Ollama truncates an input too long for it (it keeps the end: the question
    after a long document). ``others``: the characters of the rest of the prompt. None: nothing to cut."""
    if ctx <= 0 or prompt_tokens <= 0 or not text:
        return None
    per_token = (len(text) + others) / prompt_tokens
    # what is kept, not what is cut: a cut figured from the excess (with a margin) outgrew the text for an input
    # ten times the context, and nothing was cut at all. 0.81: 90% of the context, less a 10% margin for the
    # estimate (the characters a token takes vary through a text; the caller tries again if it was not enough)
    keep = int(0.81 * ctx * per_token) - others
    return text[len(text) - keep:] if 16 < keep < len(text) else None


def fit_to_context(body: dict[str, Any], prompt_tokens: int, ctx: int) -> dict[str, Any] | None:
    """``body`` shortened to fit the context (Ollama's ``truncate``): a chat loses its oldest messages, then the
    beginning of its latest one; a raw prompt its beginning. None: it cannot be shortened further."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        fewer = drop_oldest(messages, prompt_tokens, ctx)
        if fewer is not None:
            return {**body, "messages": fewer}
        last = messages[-1]
        if not isinstance(last.get("content"), str):
            return None
        others = sum(len(str(m.get("content") or "")) for m in messages[:-1])
        text = cut_front(last["content"], prompt_tokens, ctx, others)
        if text is not None:
            return {**body, "messages": [*messages[:-1], {**last, "content": text}]}
        # the rest alone is too long (a system prompt longer than the context: it was a 400): its longest message
        # loses its beginning, as Ollama cuts the front of a prompt that does not fit
        sized = [(len(m["content"]), i) for i, m in enumerate(messages[:-1]) if isinstance(m.get("content"), str)]
        if not sized:
            return None
        size, at = max(sized)
        total = others + len(last["content"])
        text = cut_front(messages[at]["content"], prompt_tokens, ctx, total - size)
        if text is None:
            return None
        return {**body, "messages": [*messages[:at], {**messages[at], "content": text}, *messages[at + 1:]]}
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        text = cut_front(prompt, prompt_tokens, ctx)
        return None if text is None else {**body, "prompt": text}
    return None


THINK_LEVELS = ("high", "medium", "low")


def thinking_kwargs(think: bool | str) -> dict[str, Any]:
    """The chat template's arguments for thinking on or off, or at a level: the switch (a template without it
    ignores it; one whose default is off needs it on), and a level's effort (gpt-oss's template reads that)."""
    if isinstance(think, bool):
        return {"enable_thinking": think}
    return {"enable_thinking": True, "reasoning_effort": think}


def thinking_asked(req: dict[str, Any]) -> bool | str | None:
    """Ollama's ``think``: true/false, or a level ("high", "medium", "low"); None when not given."""
    think = req.get("think")
    if think is None or isinstance(think, bool) or think in THINK_LEVELS:
        return think  # type: ignore[no-any-return]
    raise _bad("think", f"must be true, false or one of {', '.join(THINK_LEVELS)}")


_INT, _FLOAT, _STOP = "int", "float", "stop"
# Ollama option -> (llama-server field, type). Load-time options (num_ctx, num_gpu, num_thread, ...)
# belong to the server's command line and are ignored here, as are unknown options (Ollama warns).
_OPTIONS: dict[str, tuple[str, str]] = {
    "num_keep": ("n_keep", _INT),
    "seed": ("seed", _INT),
    "top_k": ("top_k", _INT),
    "top_p": ("top_p", _FLOAT),
    "min_p": ("min_p", _FLOAT),
    "typical_p": ("typical_p", _FLOAT),
    "repeat_last_n": ("repeat_last_n", _INT),
    "temperature": ("temperature", _FLOAT),
    "repeat_penalty": ("repeat_penalty", _FLOAT),
    "presence_penalty": ("presence_penalty", _FLOAT),
    "frequency_penalty": ("frequency_penalty", _FLOAT),
    "mirostat": ("mirostat", _INT),
    "mirostat_tau": ("mirostat_tau", _FLOAT),
    "mirostat_eta": ("mirostat_eta", _FLOAT),
    "stop": ("stop", _STOP),
}


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """A tool as llama-server takes it: Ollama lets ``type`` default to "function"; a function needs a name."""
    if tool.get("type") not in (None, "function"):
        raise _bad(f"tools[{i}].type", 'must be "function" (the only kind of tool a model is given)')
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _bad(f"tools[{i}].function.name", 'must be a string (a tool is {"type": "function", "function": '
                   '{"name": ..., "parameters": {...}}})')
    return tool if tool.get("type") is not None else {**tool, "type": "function"}


INT32_MAX = 2**31 - 1  # llama-server's integer fields


def map_options(options: Any) -> dict[str, Any]:
    """Ollama ``options`` -> llama-server sampling fields. ``num_predict`` -> ``max_tokens`` (negative, 0 or
    beyond llama-server's range: unlimited, omitted, as Ollama's runner reads it). ``null`` values are skipped.
    Numbers of the wrong type or out of range raise ApiError(400)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise _bad("options", "must be an object")
    out: dict[str, Any] = {}
    num_predict = options.get("num_predict")
    if num_predict is not None:
        n = _int_option("num_predict", num_predict, limit=False)
        if 0 < n <= INT32_MAX:
            out["max_tokens"] = n
    for name, (target, kind) in _OPTIONS.items():
        value = options.get(name)
        if value is None:
            continue
        if name == "seed":  # (Ollama's runner takes it as an unsigned 32-bit number)
            out[target] = _int_option(name, value, limit=False) % 2**32
        elif kind == _INT:
            out[target] = _int_option(name, value)
            if name == "repeat_last_n" and out[target] < -1:  # (-1: the context, set by the caller, who knows it)
                raise _bad("options.repeat_last_n", "must be -1 (the context), 0 (off) or more")
        elif kind == _FLOAT:
            out[target] = _float_option(name, value)
        else:
            out[target] = _stop_option(value)
    return out


def _int_option(name: str, value: Any, limit: bool = True) -> int:
    """Ollama reads JSON numbers as float64 and truncates them into int options (64 bits); ``limit``: within
    llama-server's 32-bit integers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"options.{name}", "must be an integer")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(f"options.{name}", "must be a finite number")
    n = int(value)
    if not -(2**63) <= n < 2**63 or (limit and not -INT32_MAX - 1 <= n <= INT32_MAX):
        raise _bad(f"options.{name}", "is out of range")
    return n


def _float_option(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"options.{name}", "must be a number")
    try:
        result = float(value)
    except OverflowError:
        raise _bad(f"options.{name}", "is out of range") from None
    if not math.isfinite(result):
        raise _bad(f"options.{name}", "must be a finite number")
    return result


def _stop_option(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise _bad("options.stop", "must be a list of strings")


def _format(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"schema": value}}
    raise _bad("format", 'must be "json" or a JSON schema object')


def _message(msg: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise _bad(where, "must be an object with a role and content")
    role = msg.get("role")
    if not isinstance(role, str) or not role:
        raise _bad(f"{where}.role", "is required and must be a string")
    content = msg.get("content")
    if content is None:
        content = ""
    elif not isinstance(content, str):
        raise _bad(f"{where}.content", "must be a string")
    _refuse_images(msg.get("images"), f"{where}.images")
    out: dict[str, Any] = {"role": role, "content": content}
    tool_calls = msg.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise _bad(f"{where}.tool_calls", "must be a list")
        if tool_calls:
            out["tool_calls"] = [
                _tool_call_to_openai(tc, f"{where}.tool_calls[{j}]", j, i) for j, tc in enumerate(tool_calls)
            ]
    for src, dst in (("tool_name", "name"), ("name", "name"), ("tool_call_id", "tool_call_id")):
        value = msg.get(src)
        if isinstance(value, str) and value:
            out[dst] = value
    return out


def _tool_call_to_openai(tc: Any, where: str, j: int, i: int) -> dict[str, Any]:
    """Ollama's ``{"function": {"name", "arguments": {...}}}`` -> OpenAI's (arguments as a JSON string)."""
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(fn, dict):
        raise _bad(where, 'must be an object like {"function": {"name": ..., "arguments": {...}}}')
    name = fn.get("name")
    if not isinstance(name, str):
        raise _bad(f"{where}.function.name", "must be a string")
    arguments = fn.get("arguments")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        text = arguments
    elif isinstance(arguments, dict):
        text = _json_text(arguments, f"{where}.function.arguments")
    else:
        raise _bad(f"{where}.function.arguments", "must be an object")
    call_id = tc.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = f"call_{i}_{j}"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def _json_text(value: Any, field: str) -> str:
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, ValueError, OverflowError):
        raise _bad(field, "must be JSON") from None


def _refuse_images(images: Any, field: str) -> None:
    if images is None or images == []:
        return
    if not isinstance(images, list):
        raise _bad(field, "must be a list of base64 images")
    raise ApiError(400, "model does not support images", param=field)


def _require_object(req: Any) -> dict[str, Any]:
    if not isinstance(req, dict):
        raise ApiError(400, "request body must be a JSON object")
    return req


def _model(req: dict[str, Any]) -> str:
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required", param="model")
    return model


def _opt_str(req: dict[str, Any], field: str) -> str:
    value = req.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(field, "must be a string")
    return value


def _bad(field: str, what: str) -> ApiError:
    return ApiError(400, f"invalid {field}: {what}", param=field)


# ---------------------------------------------------------------------------------------------
# responses

_clock_cache: tuple[int, str] = (-1, "")


def created_at(ns: int | None = None) -> str:
    """RFC 3339 UTC timestamp with up to nanosecond precision, as Ollama writes ``created_at``."""
    global _clock_cache
    if ns is None:
        ns = time.time_ns()
    secs, frac = divmod(ns, 1_000_000_000)
    cached_secs, prefix = _clock_cache
    if cached_secs != secs:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        _clock_cache = (secs, prefix)
    if not frac:
        return prefix + "Z"
    return f"{prefix}.{frac:09d}".rstrip("0") + "Z"


def load_response(model: str, kind: str, done_reason: Literal["load", "unload"]) -> dict[str, Any]:
    """The reply to a load-only request (see :func:`is_load_only`)."""
    out: dict[str, Any] = {"model": model, "created_at": created_at()}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out["done_reason"] = done_reason
    out["done"] = True
    return out


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: Any = None


class _Choice(msgspec.Struct, gc=False):
    index: int | None = 0
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_Choice] = []
    timings: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


# A plain text delta as llama-server writes it (its JSON keeps this key order): the event up to its content's
# string literal (opening quote included), and what follows the literal's closing quote.
_CHAT_TEXT_EVENT = (b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"', b'"}}],"created":')
_COMPLETION_TEXT_EVENT = (b'data: {"choices":[{"text":"', b'","index":0,"logprobs":null,"finish_reason":null}],"created":')
_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_chunks = msgspec.json.Decoder(list[_Chunk]).decode
_enc = msgspec.json.Encoder()


def _plain_run(buf: bytes) -> tuple[int, int, tuple[bytes, bytes]] | None:
    """Where whole events ``buf`` may hold a run of plain text deltas: from the first event in a plain layout to
    the end of the last event holding that layout's tail (what lies between is checked by ``_plain_texts``)."""
    for layout in (_CHAT_TEXT_EVENT, _COMPLETION_TEXT_EVENT):
        head, tail = layout
        if buf.startswith(head):
            start = 0
        else:
            start = buf.find(b"\n\n" + head) + 2
            if start < 2:
                continue
        last = buf.rfind(tail)
        end = buf.find(b"\n\n", last) + 2
        if last < start or end < 2:
            return None
        return start, end, layout
    return None


def prefill(req: dict[str, Any]) -> str:
    """The text of a chat's closing assistant message (the answer's start, given to be continued), or ""."""
    messages = req.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str):
        return str(last["content"])
    return ""


def unecho(text: str, echo: str) -> tuple[str, str]:
    """``text`` without the start of it that repeats ``echo``, and what of ``echo`` is left to come (a text that
    does not repeat it: as it is, nothing left)."""
    if text.startswith(echo):
        return text[len(echo):], ""
    if echo.startswith(text):
        return "", echo[len(text):]
    return text, ""


class Unecho:
    """A continued chat (its last message the assistant's: a prefill) answered with the new text only, as Ollama
    answers it (on /api/chat and under its ``/v1``): llama-server repeats the prefill first (a client that appends
    the answer doubled it). Applied to llama-server's reply, or to each chunk of its stream (``delta``), per
    choice; ``done`` once the first choice's repeat is off (a stream goes its fast way again)."""

    def __init__(self, echo: str) -> None:
        self.echo = echo
        self.left: dict[int, str] = {}  # choice index -> what of the prefill is still to be taken off

    @property
    def done(self) -> bool:
        return self.left.get(0) == ""

    def convert(self, doc: dict[str, Any]) -> dict[str, Any]:
        for choice in doc.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            raw_index = choice.get("index")
            index = raw_index if isinstance(raw_index, int) else 0
            holder = choice.get("message") if isinstance(choice.get("message"), dict) else choice.get("delta")
            left = self.left.get(index, self.echo)
            if left and isinstance(holder, dict) and isinstance(holder.get("content"), str) and holder["content"]:
                holder["content"], self.left[index] = unecho(holder["content"], left)
        return doc


class OllamaStream:
    """Turns parsed llama-server OpenAI-style chunks (dicts) into Ollama NDJSON objects (dicts).

    ``feed`` returns the non-final objects for one chunk (text deltas; ``thinking`` for a model's
    ``reasoning_content``; tool calls, gathered from their streamed fragments and sent whole when
    the choice finishes, as Ollama does); ``finish`` returns the final ``done: true`` object with the
    statistics. A chunk carrying ``{"error": ...}`` raises ``ApiError(source="backend")``.
    """

    __slots__ = (
        "model",
        "kind",
        "started_ns",
        "load_ns",
        "_clock",
        "_finish_reason",
        "_timings",
        "_usage",
        "_tools",
        "_unecho",
    )

    def __init__(
        self,
        model: str,
        kind: Literal["chat", "generate"],
        started_ns: int,
        load_ns: int = 0,
        clock: Callable[[], int] = time.monotonic_ns,
        echo: str = "",
    ) -> None:
        """``echo``: a chat's closing assistant message (a prefill, continued), which llama-server repeats at the
        start of its answer and Ollama does not: taken off the text (see :func:`prefill`)."""
        if kind not in ("chat", "generate"):
            raise ValueError(f"kind must be 'chat' or 'generate', not {kind!r}")
        self.model = model
        self.kind = kind
        self.started_ns = started_ns
        self.load_ns = load_ns
        self._clock = clock
        self._finish_reason: str | None = None
        self._timings: dict[str, Any] | None = None
        self._usage: dict[str, Any] | None = None
        self._tools: dict[Any, dict[str, str]] = {}  # streamed tool-call fragments by index
        self._unecho = Unecho(echo) if echo else None  # (off the text's start of the first chunks)

    @property
    def finish_reason(self) -> str | None:
        """The backend's ``finish_reason``, once seen."""
        return self._finish_reason

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(chunk, dict):
            return []
        if chunk.get("error") is not None:
            raise error_from_backend(chunk["error"])
        timings = chunk.get("timings")
        if isinstance(timings, dict) and timings:
            self._timings = timings
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage:
            self._usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return []
        out: list[dict[str, Any]] = []
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) not in (0, None):
                continue  # Ollama has one answer per request
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                thinking = delta.get("reasoning_content")
                if delta.get("tool_calls"):
                    self._collect_tool_calls(delta["tool_calls"])
            else:  # /v1/completions
                content, thinking = choice.get("text"), None
            if (isinstance(content, str) and content) or (isinstance(thinking, str) and thinking):
                out.append(self._piece(content, thinking))
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self._finish_reason = reason
                if self._tools:
                    out.append(self._tool_object())
        return out

    def feed_sse(self, parser: SSEParser, data: bytes) -> bytes:
        """The NDJSON lines for the next bytes of llama-server's stream (``parser`` frames its events).

        Hottest path: the run of whole plain text deltas among the events completed (all but a stream's first
        and last few) is turned into lines by a few whole-buffer operations, the content's JSON string literals
        copied as they are (``_plain_texts``); the events around it, or a run refused, go through ``feed_raw``."""
        if self._unecho is not None and not self._unecho.done:  # (a continued answer's first chunks: the dicts)
            return b"".join(_enc.encode(o) + b"\n" for p in parser.feed(data) for o in self._objects(p))
        whole = parser.whole_events(data)
        if whole is None:
            return self.feed_raw(parser.feed(data))
        run = _plain_run(whole) if whole and not self._tools else None
        if run is None:
            return self.feed_raw(parser.events_of(whole)) if whole else b""
        start, end, layout = run
        out = [self.feed_raw(parser.events_of(whole[:start]))] if start else []
        middle = whole[start:end] if start or end < len(whole) else whole
        lines = None if self._tools else self._plain_texts(middle, layout)
        out.append(self.feed_raw(parser.events_of(middle)) if lines is None else lines)
        if end < len(whole):
            out.append(self.feed_raw(parser.events_of(whole[end:])))
        return b"".join(out)

    def _plain_texts(self, buf: bytes, layout: tuple[bytes, bytes]) -> bytes | None:
        """Lines for ``buf`` if every event in it is a plain text delta in ``layout`` whose other fields are those
        of the first (one request's ``created``, ``id``, ``model``...; no timings, usage or error) and no literal
        holds a quote or ends in a backslash (those go the decoding way); else None."""
        head, tail = layout  # (``buf`` starts with ``head``: see _plain_run)
        pieces = buf.split(tail)  # [head+c1, R+"\n\n"+head+c2, ..., R+"\n\n"]: the rest R of each event alike
        n = len(pieces) - 1
        if n < 1:
            return None
        last = pieces[n]
        if n == 1:
            contents = [pieces[0][len(head):]]
        else:
            cut = last.find(b"\n\n")
            common = last[: cut + 2] + head
            if cut < 0 or not pieces[1].startswith(common):
                return None
            mids = pieces[1:n]
            at = len(common)
            if list(map(operator.itemgetter(slice(None, at)), mids)).count(common) != n - 1:
                return None
            contents = [pieces[0][len(head):], *map(operator.itemgetter(slice(at, None)), mids)]
        rest = last[:-2]
        if not last.endswith(b"}\n\n") or b"\n" in rest or b'"timings"' in rest or b'"usage"' in rest \
                or b'"error"' in rest:
            return None
        joined = b"\x00".join(contents) + b"\x00"  # (a raw NUL never is in JSON text)
        if b'"' in joined or b"\\\x00" in joined:
            return None
        if b"" in contents:
            contents = [c for c in contents if c]
            if not contents:
                return b""
        prefix, suffix = self._line_prefix() + b'"', b'"' + self._line_suffix
        return prefix + (suffix + prefix).join(contents) + suffix

    def feed_raw(self, payloads: list[bytes]) -> bytes:
        """The NDJSON lines for SSE ``payloads`` (each a JSON chunk of llama-server's stream).

        Hot path: a plain text delta (one choice, content only: nearly every chunk) is decoded into a typed
        struct and written from a template, no dicts; anything else (tool calls, thinking, errors, odd shapes)
        goes through ``feed``. A chunk with an ``error`` raises ``ApiError(source="backend")``."""
        lines: list[bytes] = []
        if not payloads:
            return b""
        try:  # the batch in one call (a JSON array of the chunks); one odd chunk sends them all one by one
            chunks: Sequence[_Chunk | None] = _decode_chunks(b"[" + b",".join(payloads) + b"]")
        except (msgspec.DecodeError, msgspec.ValidationError):
            chunks = []
        if len(chunks) != len(payloads):  # (a payload holding two values would shift them)
            chunks = [None] * len(payloads)
        prefix = b""
        suffix = self._line_suffix
        encode = _enc.encode
        for payload, chunk in zip(payloads, chunks, strict=True):
            if chunk is None:
                try:
                    chunk = _decode_chunk(payload)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    chunk = None
            if chunk is not None and chunk.error is None:
                if chunk.timings:
                    self._timings = chunk.timings
                if chunk.usage:
                    self._usage = chunk.usage
                choices = chunk.choices
                if not choices:
                    continue
                if len(choices) == 1:
                    c = choices[0]
                    d = c.delta
                    if (c.index == 0 and (d is None or (d.tool_calls is None and not d.reasoning_content))
                            and not self._tools):
                        text = c.text if d is None else d.content
                        if text:
                            if not prefix:
                                prefix = self._line_prefix()
                            lines.append(prefix + encode(text) + suffix)
                        if c.finish_reason:
                            self._finish_reason = c.finish_reason
                        continue
            lines.extend(encode(o) + b"\n" for o in self._objects(payload))
        return b"".join(lines)

    def _objects(self, payload: bytes) -> list[dict[str, Any]]:
        """The Ollama objects of one SSE payload, the slow way (``feed``); an error chunk raises."""
        try:
            obj = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            return []
        if isinstance(obj, dict) and "error" in obj:
            raise error_from_backend(obj["error"])
        if self._unecho is not None and isinstance(obj, dict):
            self._unecho.convert(obj)
        return self.feed(obj)

    def _line_prefix(self) -> bytes:
        head = b'{"model":' + _enc.encode(self.model) + b',"created_at":"' + created_at().encode() + b'",'
        return head + (b'"message":{"role":"assistant","content":' if self.kind == "chat" else b'"response":')

    @property
    def _line_suffix(self) -> bytes:
        return b'},"done":false}\n' if self.kind == "chat" else b',"done":false}\n'

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": ""}
            if self._tools:  # the stream ended without a finish_reason: hand them over anyway
                message["tool_calls"] = self._drain_tool_calls()
            out["message"] = message
        else:
            out["response"] = ""
        out["done_reason"] = done_reason(self._finish_reason)
        out["done"] = True
        out.update(metrics(self._timings, self._usage, self.started_ns, self.load_ns, self._clock))
        return out

    def _piece(self, content: Any, thinking: Any) -> dict[str, Any]:
        text = content if isinstance(content, str) else ""
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if isinstance(thinking, str) and thinking:
                message["thinking"] = thinking
            return {"model": self.model, "created_at": created_at(), "message": message, "done": False}
        out: dict[str, Any] = {"model": self.model, "created_at": created_at(), "response": text}
        if isinstance(thinking, str) and thinking:
            out["thinking"] = thinking
        out["done"] = False
        return out

    def _collect_tool_calls(self, fragments: Any) -> None:
        if not isinstance(fragments, list):
            return
        for pos, frag in enumerate(fragments):
            if not isinstance(frag, dict):
                continue
            index = frag.get("index", pos)
            entry = self._tools.setdefault(
                index if isinstance(index, int) else pos, {"name": "", "arguments": ""}
            )
            fn = frag.get("function")
            if not isinstance(fn, dict):
                continue
            if isinstance(fn.get("name"), str):
                entry["name"] += fn["name"]
            args = fn.get("arguments")
            if isinstance(args, str):
                entry["arguments"] += args
            elif isinstance(args, dict):
                entry["arguments"] += msgspec.json.encode(args).decode()

    def _drain_tool_calls(self) -> list[dict[str, Any]]:
        calls = [ollama_tool_call(t["name"], t["arguments"]) for _, t in sorted(self._tools.items())]
        self._tools = {}
        return calls

    def _tool_object(self) -> dict[str, Any]:
        calls = self._drain_tool_calls()
        if self.kind == "chat":
            message = {"role": "assistant", "content": "", "tool_calls": calls}
            return {"model": self.model, "created_at": created_at(), "message": message, "done": False}
        return {"model": self.model, "created_at": created_at(), "response": "", "done": False}


def chat_response(
    model: str,
    body: Any,
    started_ns: int,
    load_ns: int = 0,
    clock: Callable[[], int] = time.monotonic_ns,
    echo: str = "",
) -> dict[str, Any]:
    """A non-streamed ``/v1/chat/completions`` reply -> one Ollama ``/api/chat`` object (``echo``: see
    :class:`OllamaStream`)."""
    if echo and isinstance(body, dict):
        body = Unecho(echo).convert(body)
    choice, timings, usage = _unpack_reply(body)
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content = message.get("content")
    out_msg: dict[str, Any] = {"role": "assistant", "content": content if isinstance(content, str) else ""}
    thinking = message.get("reasoning_content")
    if isinstance(thinking, str) and thinking:
        out_msg["thinking"] = thinking
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list) and tool_calls:
        calls = []
        for tc in tool_calls:
            fn = tc.get("function") if isinstance(tc, dict) else None
            if isinstance(fn, dict):
                name = fn.get("name")
                calls.append(ollama_tool_call(name if isinstance(name, str) else "", fn.get("arguments")))
        if calls:
            out_msg["tool_calls"] = calls
    out: dict[str, Any] = {"model": model, "created_at": created_at(), "message": out_msg}
    out["done_reason"] = done_reason(choice.get("finish_reason"))
    out["done"] = True
    out.update(metrics(timings, usage, started_ns, load_ns, clock))
    return out


def generate_response(
    model: str,
    body: Any,
    started_ns: int,
    load_ns: int = 0,
    clock: Callable[[], int] = time.monotonic_ns,
) -> dict[str, Any]:
    """A non-streamed chat or text completion reply -> one Ollama ``/api/generate`` object."""
    choice, timings, usage = _unpack_reply(body)
    message = choice.get("message")
    if isinstance(message, dict):
        text, thinking = message.get("content"), message.get("reasoning_content")
    else:
        text, thinking = choice.get("text"), None
    out: dict[str, Any] = {
        "model": model,
        "created_at": created_at(),
        "response": text if isinstance(text, str) else "",
    }
    if isinstance(thinking, str) and thinking:
        out["thinking"] = thinking
    out["done_reason"] = done_reason(choice.get("finish_reason"))
    out["done"] = True
    out.update(metrics(timings, usage, started_ns, load_ns, clock))
    return out


def _unpack_reply(body: Any) -> tuple[dict[str, Any], Any, Any]:
    if not isinstance(body, dict):
        raise ApiError(502, "backend sent a reply that is not a JSON object", source="backend")
    if body.get("error") is not None:
        raise error_from_backend(body["error"])
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    return choice, body.get("timings"), body.get("usage")


def error_from_backend(err: Any) -> ApiError:
    """llama-server's ``{"code", "message", "type"}`` error object -> ApiError(source="backend")."""
    if isinstance(err, dict):
        message = err.get("message")
        status = err.get("code")
        kind = err.get("type")
    else:
        message, status, kind = err, None, None
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
        status = 500
    return ApiError(
        status,
        message if isinstance(message, str) and message else "backend error",
        code=kind if isinstance(kind, str) else "",
        source="backend",
    )


def done_reason(finish_reason: Any) -> str:
    """OpenAI ``finish_reason`` -> Ollama ``done_reason``: ``length`` stays, everything else (``stop``,
    ``tool_calls``, none) is ``stop``."""
    return "length" if finish_reason == "length" else "stop"


def ollama_tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """One tool call in Ollama's shape; ``arguments`` (OpenAI's JSON string) becomes an object.
    Arguments that are not a JSON object are kept as ``{"value": <parsed JSON or the raw text>}``."""
    if isinstance(arguments, dict):
        args: Any = arguments
    elif isinstance(arguments, str) and arguments.strip():
        try:
            args = msgspec.json.decode(arguments)
        except (msgspec.DecodeError, ValueError):
            args = arguments
        if not isinstance(args, dict):
            args = {"value": args}
    else:
        args = {}
    return {"function": {"name": name, "arguments": args}}


def _ms_to_ns(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    ns = value * 1_000_000
    return int(round(ns)) if math.isfinite(ns) and ns > 0 else 0


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return max(int(value), 0)


def metrics(
    timings: Any, usage: Any, started_ns: int, load_ns: int, clock: Callable[[], int]
) -> dict[str, int]:
    """Ollama's statistics (counts; durations in ns) from llama-server's ``timings`` (ms), falling back
    to the OpenAI ``usage`` counts.

    ``prompt_eval_count`` is the whole prompt, as Ollama reports it: the tokens evaluated now
    (``prompt_n``) plus those reused from llama-server's cache (``cache_n``); ``prompt_eval_duration``
    is the time spent on the evaluated ones.
    """
    t = timings if isinstance(timings, dict) else {}
    u = usage if isinstance(usage, dict) else {}
    prompt_n = _count(t.get("prompt_n"))
    if prompt_n is None:
        prompt_n = _count(u.get("prompt_tokens")) or 0
    else:
        prompt_n += _count(t.get("cache_n")) or 0
    predicted_n = _count(t.get("predicted_n"))
    if predicted_n is None:
        predicted_n = _count(u.get("completion_tokens")) or 0
    return {
        "total_duration": max(int(clock()) - int(started_ns), 0),
        "load_duration": max(int(load_ns), 0),
        "prompt_eval_count": prompt_n,
        "prompt_eval_duration": _ms_to_ns(t.get("prompt_ms")),
        "eval_count": predicted_n,
        "eval_duration": _ms_to_ns(t.get("predicted_ms")),
    }
