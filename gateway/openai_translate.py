"""OpenAI / LM Studio ``/v1/chat/completions`` and ``/v1/completions`` -> llama-server, unchanged but checked.

llama-server speaks this protocol itself, so a request is validated (enough to answer a bad one with
a clear 400 in OpenAI's shape instead of a backend error) and passed on with every other field,
llama.cpp-specific ones included. Pure functions, no I/O; invalid input raises only
:class:`~gateway.errors.ApiError` (400, ``param`` naming the field).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import msgspec

from gateway.errors import ApiError
from gateway.ollama_translate import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    BackendRequest,
    Unecho,
    prefill,
    thinking_kwargs,
)

__all__ = ["RESPONSES_PATH", "BackendRequest", "ChoiceStream", "LegacyCompletion", "ResponsesStream", "Unecho",
           "chat_to_backend", "completions_to_backend", "prefill", "fill_response", "response_fields",
           "responses_to_backend", "rewrite_model", "several_choices"]

RESPONSES_PATH = "/v1/responses"

_ABSENT = object()


def chat_to_backend(req: Any) -> BackendRequest:
    """Validate an OpenAI chat completion request; ``max_completion_tokens`` becomes ``max_tokens``. Media
    content parts are named in ``media`` (the caller checks that the model takes them)."""
    body = _common(req)
    messages = body.get("messages", _ABSENT)
    if messages is _ABSENT or messages is None:
        raise _missing("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages")
    media = ""
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(f"messages[{i}]", "must be an object with a role")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"messages[{i}].role", "must be a non-empty string")
        if role not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role", f"{role!r} is not a role ({', '.join(sorted(CHAT_ROLES))})")
        for field in ("name", "tool_call_id"):
            if msg.get(field) is not None and not isinstance(msg[field], str):
                raise _bad(f"messages[{i}].{field}", "must be a string")
        if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
            raise _missing(f"messages[{i}].tool_call_id", " (a tool message answers a tool call: name it)")
        content = msg.get("content")
        if isinstance(content, list):
            if not content:
                raise _bad(f"messages[{i}].content", "must not be an empty list")
            media = _check_parts(content, f"messages[{i}].content", role) or media
            if role == "assistant" and any(p.get("type") == "refusal" for p in content):  # (llama-server: text)
                messages[i] = msg = {**msg, "content": [
                    {"type": "text", "text": p["refusal"]} if p.get("type") == "refusal" else p for p in content]}
        elif content is not None and not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "must be a string or a list of content parts")
    max_completion = body.pop("max_completion_tokens", None)
    if max_completion is not None:  # (OpenAI's current name: it wins over the deprecated max_tokens, as in llama.cpp)
        _check_int(max_completion, "max_completion_tokens")
        body["max_tokens"] = max_completion
    for field in ("tools", "functions"):
        _check(body, field, list, "a list")
    for j, tool in enumerate(body.get("tools") or []):
        _check_tool(tool, f"tools[{j}]")
    for j, fn in enumerate(body.get("functions") or []):
        _check_function(fn, f"functions[{j}]")
    _tool_choice(body, lambda tool: (tool.get("function") or {}).get("name"),
                 lambda choice: (choice.get("function") or {}).get("name"), "tool_choice.function.name")
    _check_response_format(body.get("response_format"))
    _reasoning_effort(body)
    return BackendRequest(CHAT_PATH, {**body, "messages": messages}, bool(body.get("stream")), media)


TOOL_CHOICES = ("none", "auto", "required")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def _reasoning_effort(body: dict[str, Any]) -> None:
    """OpenAI's ``reasoning_effort`` (in place): checked, and given to the chat template as Ollama's ``think`` is
    (llama-server ignored it: any value, a model that does not think included, was a 200)."""
    effort = body.get("reasoning_effort")
    if effort is None:
        return
    if effort not in REASONING_EFFORTS:
        raise _bad("reasoning_effort", f"must be one of {', '.join(REASONING_EFFORTS)}, not {effort!r}")
    if "chat_template_kwargs" not in body:  # (llama.cpp's own field, given: it wins)
        body["chat_template_kwargs"] = thinking_kwargs(False if effort == "none" else effort)


def thinking_asked(body: dict[str, Any]) -> bool:
    """Does a chat request ask the model to think (``reasoning_effort`` other than "none")?"""
    return body.get("reasoning_effort") not in (None, "none")


def _tool_choice(body: dict[str, Any], tool_name: Callable[[dict[str, Any]], Any],
                 chosen_name: Callable[[dict[str, Any]], Any], name_param: str) -> None:
    """Check ``tool_choice`` (in place). llama-server reads only its strings (an object was ignored: any tool, or
    none, where one was named), so a named function becomes ``required`` among that tool alone."""
    choice = body.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise _bad("tool_choice", f"must be one of {', '.join(TOOL_CHOICES)} or a function to call, "
                                      f"not {choice!r}")
        if choice == "required" and not body.get("tools"):
            raise _bad("tool_choice", "'required' is only allowed when 'tools' are specified")
        return
    if not isinstance(choice, dict):
        raise _bad("tool_choice", "must be a string or an object")
    if choice.get("type") != "function":
        raise _bad("tool_choice.type", "must be 'function'")
    name = chosen_name(choice)
    if not isinstance(name, str) or not name:
        raise _bad(name_param, "must name the function to call")
    named = [t for t in body.get("tools") or [] if isinstance(t, dict) and tool_name(t) == name]
    if not named:
        raise _bad(name_param, f"there is no function {name!r} in tools")
    body["tools"], body["tool_choice"] = named[:1], "required"


CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _check_tool(tool: Any, where: str) -> None:
    """A chat tool: ``{"type": "function", "function": {"name", ...}}`` (llama-server's 500s otherwise)."""
    if not isinstance(tool, dict):
        raise _bad(where, "must be an object")
    if tool.get("type") != "function":
        raise _bad(f"{where}.type", f"unsupported tool type {tool.get('type')!r} (function)")
    _check_function(tool.get("function"), f"{where}.function")


def _check_function(fn: Any, where: str) -> None:
    if not isinstance(fn, dict):
        raise _missing(where) if fn is None else _bad(where, "must be an object with a name")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise _missing(f"{where}.name") if name is None else _bad(f"{where}.name", "must be a non-empty string")
    for field, kind, what in (("description", str, "a string"), ("parameters", dict, "an object (a JSON schema)")):
        if fn.get(field) is not None and not isinstance(fn[field], kind):
            raise _bad(f"{where}.{field}", f"must be {what}")


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise _bad("response_format", "must be an object")
    kind = fmt.get("type")
    if kind not in RESPONSE_FORMATS:
        raise _bad("response_format.type", f"must be one of {', '.join(RESPONSE_FORMATS)}")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise _missing("response_format.json_schema") if spec is None else \
                _bad("response_format.json_schema", "must be an object")
        if spec.get("schema") is not None and not isinstance(spec["schema"], dict):
            raise _bad("response_format.json_schema.schema", "must be an object (a JSON schema)")


# Content parts that are not text: only a model with a multimodal projector takes them (catalog.py checks).
MEDIA_PARTS = frozenset({"image_url", "input_audio", "file"})


def _check_parts(parts: list[Any], field: str, role: str = "user") -> str:
    """Check a message's content parts; returns the type of its first media part ("" when all are text)."""
    media = ""
    for j, part in enumerate(parts):
        where = f"{field}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise _bad(where, "must be a content part object with a type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{where}.text", "must be a string")
        elif kind in MEDIA_PARTS:
            media = media or kind
        elif kind == "refusal" and role == "assistant":  # (an assistant's earlier refusal, given back)
            if not isinstance(part.get("refusal"), str):
                raise _bad(f"{where}.refusal", "must be a string")
        else:
            raise _bad(f"{where}.type", f"unknown content part type {kind!r} (text, {', '.join(sorted(MEDIA_PARTS))})")
    return media


def completions_to_backend(req: Any) -> BackendRequest:
    """Validate an OpenAI (legacy) text completion request: ``prompt`` is a string or a list."""
    body = _common(req)
    prompt = body.get("prompt", _ABSENT)
    if prompt is _ABSENT or prompt is None:
        raise _missing("prompt")
    if isinstance(prompt, list):
        if not prompt:
            raise _bad("prompt", "must not be an empty list")
        for i, item in enumerate(prompt):
            # strings, token ids, token-id lists, or llama.cpp's {"prompt_string", ...} objects
            if isinstance(item, bool) or not isinstance(item, str | int | list | dict):
                raise _bad(f"prompt[{i}]", "must be a string, a token id or a list of token ids")
    elif not isinstance(prompt, str):
        raise _bad("prompt", "must be a string or a list")
    _check(body, "suffix", str, "a string")
    _check(body, "echo", bool, "a boolean")
    return BackendRequest(COMPLETIONS_PATH, body, bool(body.get("stream")))


# The Responses API's input parts that are not text (only a model with a multimodal projector takes them)
RESPONSES_MEDIA_PARTS = frozenset({"input_image", "input_file", "input_audio"})
RESPONSES_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


ROLES = frozenset({"user", "assistant", "system", "developer"})


def responses_to_backend(req: Any) -> BackendRequest:
    """Validate an OpenAI Responses API request (``POST /v1/responses``: llama-server serves it itself) and bring
    it to what llama-server reads: ``input`` is a string or a list of items; a message item may leave out its
    ``type`` and give an assistant's content as a string (OpenAI's "easy" input messages: llama-server refused
    them); ``text.format`` (json_schema / json_object) becomes ``response_format`` (llama-server ignored it). Media
    parts are named in ``media``."""
    body = _common(req)
    items = body.get("input", _ABSENT)
    if items is _ABSENT or items is None:
        raise _missing("input")
    media = ""
    if isinstance(items, list):
        if not items:
            raise _bad("input", "must be a string or a non-empty list of input items")
        body["input"] = items = [dict(item) if isinstance(item, dict) else item for item in items]
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise _bad(f"input[{i}]", "must be an input item object")
            if item.get("type", "message") == "message" and "role" in item:
                media = _message_item(item, f"input[{i}]") or media
    elif not isinstance(items, str):
        raise _bad("input", "must be a string or a list of input items")
    _check(body, "instructions", str, "a string")
    _check(body, "store", bool, "a boolean")
    if body.get("truncation") not in (None, "auto", "disabled"):
        raise _bad("truncation", f"must be 'auto' or 'disabled', not {body['truncation']!r}")
    _check(body, "previous_response_id", str, "a string (the id of a stored response)")
    _check_int(body.get("max_output_tokens"), "max_output_tokens")
    if body.get("top_logprobs") is not None:  # (the Responses API has no logprobs switch; llama-server asked for one)
        body.setdefault("logprobs", True)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", "must be a list")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise _bad(f"tools[{i}]", "must be a function tool: {\"type\": \"function\", \"name\": ...}")
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                hint = " (the Responses API's tools have name and parameters at the top, not under \"function\")"
                raise _bad(f"tools[{i}].name", "is required" + (hint if "function" in tool else ""))
    _tool_choice(body, lambda tool: tool.get("name"), lambda choice: choice.get("name"), "tool_choice.name")
    if body.get("text") is not None:
        grammar = _response_format(body["text"])
        if grammar is not None:
            body.setdefault("response_format", grammar)
    return BackendRequest(RESPONSES_PATH, body, bool(body.get("stream")), media)


def _response_format(text: Any) -> dict[str, Any] | None:
    """The Responses API's ``text.format`` as the ``response_format`` llama-server reads (None: plain text)."""
    fmt = text.get("format") if isinstance(text, dict) else _ABSENT
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad("text", "must be an object with a format")
    kind = fmt.get("type", "text")
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format.schema", "must be a JSON schema object")
        return {"type": "json_schema", "json_schema": {
            "name": fmt.get("name") or "output", "schema": fmt["schema"], "strict": bool(fmt.get("strict"))}}
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "text":
        raise _bad("text.format.type", f"must be text, json_schema or json_object, not {kind!r}")
    return None


def _message_item(item: dict[str, Any], where: str) -> str:
    """Check (and complete, in place) a message input item; returns the type of its first media part."""
    role = item.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role", f"must be one of {', '.join(sorted(ROLES))}")
    item["type"] = "message"
    content = item.get("content")
    if isinstance(content, str):
        if role == "assistant":  # (llama-server reads an assistant's words only as output_text parts)
            item["content"] = [{"type": "output_text", "text": content, "annotations": []}]
        return ""
    if not isinstance(content, list):
        raise _bad(f"{where}.content", "must be a string or a list of content parts")
    media = ""
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in RESPONSES_MEDIA_PARTS:
            media = media or str(kind)
        elif kind in RESPONSES_TEXT_PARTS:
            if not isinstance(part.get("text"), str):  # type: ignore[union-attr]
                raise _bad(f"{where}.content[{j}].text", "must be a string")
        elif kind != "refusal":
            raise _bad(f"{where}.content[{j}].type", f"unknown content part type {kind!r}")
    return media


_ITEM_EVENTS = ("response.output_item.", "response.content_part.", "response.output_text.",
                "response.function_call_arguments.", "response.refusal.", "response.reasoning")
_LIFECYCLE_EVENTS = ("response.created", "response.in_progress", "response.queued")
_PART_EVENTS = ("response.content_part.", "response.output_text.", "response.refusal.")


class ResponsesStream:
    """llama-server's Responses API stream, completed for the openai SDK's accumulator (``responses.stream``
    crashed on it): the ``sequence_number``, ``output_index`` and ``content_index`` its events leave out, and the
    model name asked for (``model``; None: as it came). Named events stay named."""

    def __init__(self, model: str | None, name: str = "", created: int | None = None,
                 completed: Callable[[dict[str, Any]], Any] | None = None,
                 fields: dict[str, Any] | None = None) -> None:
        self.model = model
        self.completed = completed  # called with response.completed's response (may change it)
        self.fields = fields or {}  # what every response object says of the request (response_fields)
        self.arguments_done: set[int] = set()  # function call items whose arguments.done has been sent
        self.response_id = ""  # (from response.created: a failure names it)
        self.name = model or name  # the model's name where llama-server gives none (response.created)
        self.created = int(time.time()) if created is None else created
        self.rest = b""
        self.seq = 0
        self.item = -1  # the output item the events are about (output_item.added starts the next)
        self.part = -1  # its content part (content_part.added starts the next)

    def feed(self, chunk: bytes) -> bytes:
        data = self.rest + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self.rest = data
            return b""
        self.rest = data[end + 2:]
        return b"".join(self._event(block) for block in data[:end].split(b"\n\n") if block.strip())

    def flush(self) -> bytes:
        rest, self.rest = self.rest, b""
        return self._event(rest) if rest.strip() else b""

    def _event(self, block: bytes) -> bytes:
        lines = block.split(b"\n")
        at = next((i for i, line in enumerate(lines) if line.startswith(b"data:")), None)
        if at is None:
            return block + b"\n\n"
        try:
            doc = msgspec.json.decode(lines[at][5:])
        except msgspec.DecodeError:
            return block + b"\n\n"
        before = b""
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):  # (llama-server's own, in the chat shape)
            return self.failed(doc["error"])
        if isinstance(doc, dict) and "error" not in doc:
            kind = str(doc.get("type", ""))
            if kind == "response.output_item.done":
                before = self._arguments_done(doc.get("item"))
            doc.setdefault("sequence_number", self.seq)
            self.seq += 1
            if kind == "response.output_item.added":
                self.item, self.part = self.item + 1, -1
            elif kind == "response.content_part.added":
                self.part += 1
            elif kind == "response.function_call_arguments.done":
                self.arguments_done.add(self.item)
            if kind.startswith(_ITEM_EVENTS):
                doc.setdefault("output_index", max(self.item, 0))
            if kind.startswith(_PART_EVENTS):
                doc.setdefault("content_index", max(self.part, 0))
            response = doc.get("response")
            if isinstance(response, dict):
                if isinstance(response.get("id"), str):
                    self.response_id = response["id"]
                if self.model is not None and "model" in response:
                    response["model"] = self.model
                if kind in _LIFECYCLE_EVENTS:
                    # (llama-server's carry id, object and status only: the openai SDK 2.x builds its snapshot from
                    # response.created, and its output None crashed responses.stream: "NoneType has no append")
                    response.setdefault("object", "response")
                    response.setdefault("created_at", self.created)
                    response.setdefault("model", self.name)
                    response.setdefault("output", [])
                fill_response(response, self.fields)
                if kind == "response.completed" and self.completed is not None:
                    self.completed(response)
            lines[at] = b"data: " + msgspec.json.encode(doc)
        return before + b"\n".join(lines) + b"\n\n"

    def failed(self, error: dict[str, Any]) -> bytes:
        """The end of a stream cut by ``error`` (OpenAI's error object) as the Responses API says it: an ``error``
        event, then ``response.failed`` (it came as a chat completion's error chunk, which the SDK's Responses
        stream does not read as an event)."""
        ev = {"type": "error", "code": error.get("code"), "message": error.get("message", ""),
              "param": error.get("param"), "sequence_number": self.seq}
        response = fill_response({"id": self.response_id, "object": "response", "created_at": self.created,
                                  "model": self.name, "status": "failed", "output": []}, self.fields)
        response["error"] = {"code": error.get("code") or "server_error", "message": error.get("message", "")}
        done = {"type": "response.failed", "sequence_number": self.seq + 1, "response": response}
        self.seq += 2
        return (b"event: error\ndata: " + msgspec.json.encode(ev) + b"\n\nevent: response.failed\ndata: "
                + msgspec.json.encode(done) + b"\n\n")

    def _arguments_done(self, item: Any) -> bytes:
        """OpenAI's ``response.function_call_arguments.done`` (the whole arguments), where llama-server went from
        the deltas to ``output_item.done``."""
        if not isinstance(item, dict) or item.get("type") != "function_call" or self.item in self.arguments_done:
            return b""
        self.arguments_done.add(self.item)
        event = {"type": "response.function_call_arguments.done", "sequence_number": self.seq,
                 "item_id": item.get("id", ""), "output_index": max(self.item, 0),
                 "arguments": item.get("arguments", ""), "name": item.get("name", "")}
        self.seq += 1
        return b"event: response.function_call_arguments.done\ndata: " + msgspec.json.encode(event) + b"\n\n"


def response_fields(req: dict[str, Any]) -> dict[str, Any]:
    """What OpenAI's response objects say of the request they answer (llama-server's leave them out: the SDK's
    ``response.tools`` was None, and code iterating it failed)."""
    return {"instructions": req.get("instructions"), "tools": req.get("tools") or [],
            "tool_choice": req.get("tool_choice", "auto"), "parallel_tool_calls": req.get("parallel_tool_calls", True),
            "temperature": req.get("temperature", 1.0), "top_p": req.get("top_p", 1.0),
            "max_output_tokens": req.get("max_output_tokens"), "metadata": req.get("metadata") or {},
            "text": req.get("text") or {"format": {"type": "text"}}, "truncation": req.get("truncation", "disabled"),
            "error": None, "incomplete_details": None}


def fill_response(response: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """A response object with ``fields`` where it has none (and the usage details OpenAI's always carry)."""
    for key, value in fields.items():
        response.setdefault(key, value)
    usage = response.get("usage")
    if isinstance(usage, dict):
        usage.setdefault("input_tokens_details", {"cached_tokens": 0})
        usage.setdefault("output_tokens_details", {"reasoning_tokens": 0})
    return response


class LegacyCompletion:
    """A ``/v1/completions`` answer (or each chunk of its stream) in the legacy shape OpenAI's clients read where
    llama-server differs: ``logprobs`` as ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``
    (it sends the chat shape, ``{"content": [...]}``: the client's fields were all None), ``echo`` (the prompt
    before the text: llama-server ignores it), and a ``cmpl-`` id. One per request: offsets run on across chunks."""

    def __init__(self, req: dict[str, Any]) -> None:
        prompt = req.get("prompt")
        self.prompts = [prompt] if isinstance(prompt, str) else [p if isinstance(p, str) else "" for p in prompt] \
            if isinstance(prompt, list) else [""]
        self.echo = bool(req.get("echo"))
        options = req.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.echoed: set[int] = set()
        self.offsets: dict[int, int] = {}  # choice index -> text offset of its next token

    def _prompt(self, index: int) -> str:
        return self.prompts[index] if 0 <= index < len(self.prompts) else ""

    def convert(self, doc: dict[str, Any]) -> dict[str, Any]:
        rid = doc.get("id")
        if isinstance(rid, str) and rid.startswith("chatcmpl-"):
            doc["id"] = "cmpl-" + rid.removeprefix("chatcmpl-")
        for choice in doc.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            raw_index = choice.get("index")
            index = raw_index if isinstance(raw_index, int) else 0
            prompt = self._prompt(index)
            if self.echo and index not in self.echoed and isinstance(choice.get("text"), str):
                self.echoed.add(index)
                choice["text"] = prompt + choice["text"]
            lp = choice.get("logprobs")
            if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                at = self.offsets.get(index, len(prompt))
                tokens, token_lps, tops, offsets = [], [], [], []
                for t in lp["content"]:
                    if not isinstance(t, dict):
                        continue
                    token = str(t.get("token", ""))
                    tokens.append(token)
                    token_lps.append(t.get("logprob"))
                    top = {str(x.get("token", "")): x.get("logprob") for x in t.get("top_logprobs") or []
                                 if isinstance(x, dict)}
                    top.setdefault(token, t.get("logprob"))  # (OpenAI's: the sampled token is always among them)
                    tops.append(top)
                    offsets.append(at)
                    at += len(token)
                self.offsets[index] = at
                choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                                      "text_offset": offsets}
        return doc

    def stream_chunks(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """A stream chunk converted, its ``usage`` as OpenAI streams it: only with ``stream_options.include_usage``,
        and then in a chunk of its own with no choices (llama-server puts it on the last chunk, asked or not)."""
        doc = self.convert(doc)
        if "usage" not in doc or not doc.get("choices"):
            return [doc] if self.include_usage or "usage" not in doc else []
        usage = doc.pop("usage")
        if not self.include_usage:
            return [doc]
        tail: dict[str, Any] = {k: doc[k] for k in ("id", "object", "created", "model", "system_fingerprint")
                                if k in doc}
        return [doc, {**tail, "choices": [], "usage": usage}]


def several_choices(req: dict[str, Any]) -> bool:
    """Does the answer carry several choices (``n`` > 1, or several prompts: a list of strings or of token lists)?"""
    n, prompt = req.get("n"), req.get("prompt")
    return (isinstance(n, int) and n > 1) or (isinstance(prompt, list) and len(prompt) > 1
                                              and not all(isinstance(p, int) for p in prompt))


def _choice_index(doc: dict[str, Any]) -> int:
    choices = doc.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    index = first.get("index") if isinstance(first, dict) else None
    return index if isinstance(index, int) else -1


class ChoiceStream:
    """A stream of several choices as OpenAI's clients read it. llama-server runs a task per choice and sends their
    chunks as they come: a choice's first chunk could come before those of the choices before it (the openai SDK's
    stream helpers failed on it: IndexError), several prompts began with ``data: null``, and each task of ``n``
    sent a usage chunk of its own, mid-stream. Here choices begin in order, nulls are dropped, and ``n``'s usage
    comes once, last, with the completion tokens of all choices (the prompt is counted once, as OpenAI does)."""

    def __init__(self) -> None:
        self.next = 0  # the lowest choice index not begun yet
        self.held: list[dict[str, Any]] = []  # chunks of choices whose turn has not come
        self.usage: dict[str, Any] | None = None  # the usage chunk to send last (totals)

    def push(self, doc: Any) -> list[Any]:
        """The chunks to send now for ``doc`` (none, it, or it and the chunks it let through)."""
        if doc is None:
            return []
        if not isinstance(doc, dict) or "error" in doc:
            return [doc]
        if doc.get("choices") == [] and isinstance(doc.get("usage"), dict):
            self._count(doc)
            return []
        index = _choice_index(doc)
        if index > self.next:
            self.held.append(doc)
            return []
        if index < self.next:
            return [doc]
        self.next += 1
        return [doc, *self._due()]

    def _due(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            due = [d for d in self.held if _choice_index(d) <= self.next]
            if not due:
                return out
            self.held = [d for d in self.held if _choice_index(d) > self.next]
            for d in due:
                self.next = max(self.next, _choice_index(d) + 1)
            out += due

    def _count(self, doc: dict[str, Any]) -> None:
        if self.usage is None:
            self.usage = doc
            return
        total, usage = self.usage["usage"], doc["usage"]
        add = usage.get("completion_tokens")
        if isinstance(add, int) and isinstance(total.get("completion_tokens"), int):
            total["completion_tokens"] += add
            if isinstance(total.get("prompt_tokens"), int):
                total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]

    def finish(self) -> list[Any]:
        """What is still held, then the usage: the chunks to send before ``[DONE]``."""
        held, self.held = sorted(self.held, key=_choice_index), []
        return held + ([self.usage] if self.usage is not None else [])


def rewrite_model(chunk: dict[str, Any], model: str) -> dict[str, Any]:
    """Set ``model`` to the name the client asked for (llama-server reports its own alias).

    Changes ``chunk`` in place (it is a freshly decoded reply) and returns it; error objects are
    left alone.
    """
    if isinstance(chunk, dict) and "error" not in chunk:
        chunk["model"] = model
    return chunk


def _common(req: Any) -> dict[str, Any]:
    """Checks shared by both endpoints; returns a shallow copy of the request to send on."""
    if not isinstance(req, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = req.get("model", _ABSENT)
    if model is _ABSENT or model is None:
        raise _missing("model", " (you must provide a model parameter)")
    if not isinstance(model, str):
        raise _bad("model", "must be a string")
    body = dict(req)
    _check(body, "stream", bool, "a boolean")
    _check(body, "stream_options", dict, "an object")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise _bad("stream_options", "is only allowed with stream: true")
    for field in ("max_tokens", "n", "seed", "top_k", "top_logprobs"):
        _check_int(body.get(field), field)
    if not isinstance(body.get("logprobs"), bool):  # chat: a boolean; completions: an integer
        _check_int(body.get("logprobs"), "logprobs")
    for field in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repeat_penalty"):
        _check_number(body.get(field), field)
    for field, low, high in _RANGES:  # (OpenAI's; llama-server took any, and wrapped big integers to 32 bits)
        value = body.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool) and not low <= value <= high:
            raise _bad(field, f"must be between {low} and {high}, got {value}")
    _check_logit_bias(body.get("logit_bias"))
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop", "must be a string or a list of strings")
    return body


_INT32 = 2**31 - 1
# (max_tokens -1: no limit, as llama-server and LM Studio take it; n_probs and legacy logprobs, llama.cpp's list of
# candidates per token: unbounded, each token's list of the vocabulary, ~75 MB a token)
_RANGES = (("temperature", 0, 2), ("top_p", 0, 1), ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2),
           ("n", 1, 128), ("top_logprobs", 0, 20), ("n_probs", 0, 20), ("logprobs", 0, 20),
           ("max_tokens", -1, _INT32), ("top_k", -_INT32, _INT32), ("seed", -2**63, 2**64 - 1))


def _check_logit_bias(bias: Any) -> None:
    """OpenAI's ``{"token id": bias}`` (-100 to 100); llama.cpp's ``[[token, bias], ...]`` goes on as it is."""
    if bias is None or isinstance(bias, list):
        return
    if not isinstance(bias, dict):
        raise _bad("logit_bias", "must be an object of token ids to numbers between -100 and 100")
    for key, value in bias.items():
        if not key.lstrip("-").isdigit():
            raise _bad("logit_bias", f"{key!r} is not a token id")
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise _bad("logit_bias", f"the bias of {key} must be a number between -100 and 100")


def _check(body: dict[str, Any], field: str, kind: Any, what: str) -> None:
    value = body.get(field)
    if value is not None and not isinstance(value, kind):
        raise _bad(field, f"must be {what}")


def _check_int(value: Any, field: str) -> None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return
    if not (isinstance(value, float) and math.isfinite(value) and value.is_integer()):
        raise _bad(field, "must be an integer")


def _check_number(value: Any, field: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(field, "must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(field, "must be a finite number")


def _bad(field: str, what: str) -> ApiError:
    return ApiError(400, f"invalid {field}: {what}", param=field)


def _missing(field: str, hint: str = "") -> ApiError:
    return ApiError(400, f"{field} is required{hint}", param=field)
