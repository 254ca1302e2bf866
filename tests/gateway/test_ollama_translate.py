"""Ollama /api/chat and /api/generate <-> llama-server translation (gateway/ollama_translate.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ApiError, ollama_error_body
from gateway.ollama_translate import (
    BackendRequest,
    OllamaStream,
    chat_response,
    chat_to_backend,
    created_at,
    generate_response,
    generate_to_backend,
    is_load_only,
    load_response,
    parse_keep_alive,
)
from gateway.sse import SSEParser

GOLDEN = Path(__file__).parent / "golden"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
STATS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
START = 1_000_000_000


def clock_at(ns: int):
    return lambda: ns


def golden_chunks(name: str) -> list[dict[str, Any]]:
    parser = SSEParser()
    chunks = [msgspec.json.decode(p) for p in parser.feed((GOLDEN / name).read_bytes())]
    assert parser.done
    return chunks


def golden_json(name: str) -> dict[str, Any]:
    return msgspec.json.decode((GOLDEN / name).read_bytes())


def validate_with_ollama_client(obj: dict[str, Any], kind: str) -> None:
    """The official client's own models accept what we send."""
    types = pytest.importorskip("ollama._types")
    model = types.ChatResponse if kind == "chat" else types.GenerateResponse
    model.model_validate(obj)


# --- keep_alive --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("10s", 10.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("0", 0.0),
        ("0s", 0.0),
        ("-1", -1.0),
        ("-5m", -1.0),
        ("-1s", -1.0),
        ("300", 300.0),
        (300, 300.0),
        (2.5, 2.5),
        (0, 0.0),
        (-1, -1.0),
        (-0.5, -1.0),
        (10**30, -1.0),  # longer than Go's Duration: forever
    ],
)
def test_keep_alive(value: Any, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize(
    "value", ["abc", "5x", "m", "5 m", "--5m", "1h-30m", "nan", "inf", True, [], {}, [5], "1" * 100]
)
def test_keep_alive_invalid(value: Any) -> None:
    with pytest.raises(ApiError) as info:
        parse_keep_alive(value)
    assert info.value.status == 400 and info.value.param == "keep_alive"


# --- requests ----------------------------------------------------------------------------------


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_chat_defaults_to_streaming_with_usage() -> None:
    req = chat_to_backend(chat())
    assert req == BackendRequest(
        "/v1/chat/completions",
        {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        True,
    )


def test_chat_not_streaming() -> None:
    req = chat_to_backend(chat(stream=False))
    assert req.stream is False and req.body["stream"] is False and "stream_options" not in req.body


def test_options_mapping() -> None:
    options = {
        "num_predict": 12,
        "temperature": 0,
        "top_k": 20,
        "top_p": 0.9,
        "min_p": 0.05,
        "typical_p": 0.7,
        "repeat_penalty": 1.2,
        "repeat_last_n": 33,
        "presence_penalty": 1.5,
        "frequency_penalty": 1.0,
        "seed": 42,
        "stop": ["\n", "user:"],
        "mirostat": 1,
        "mirostat_tau": 0.8,
        "mirostat_eta": 0.6,
        "num_keep": 5,
        # load-time and unknown options are not request fields for llama-server
        "num_ctx": 1024,
        "num_gpu": 1,
        "num_thread": 8,
        "use_mmap": True,
        "penalize_newline": True,
        "no_such_option": "x",
    }
    body = chat_to_backend(chat(options=options)).body
    mapped = {k: v for k, v in body.items() if k not in ("model", "messages", "stream", "stream_options")}
    assert mapped == {
        "max_tokens": 12,
        "temperature": 0.0,
        "top_k": 20,
        "top_p": 0.9,
        "min_p": 0.05,
        "typical_p": 0.7,
        "repeat_penalty": 1.2,
        "repeat_last_n": 33,
        "presence_penalty": 1.5,
        "frequency_penalty": 1.0,
        "seed": 42,
        "stop": ["\n", "user:"],
        "mirostat": 1,
        "mirostat_tau": 0.8,
        "mirostat_eta": 0.6,
        "n_keep": 5,
    }
    assert isinstance(body["temperature"], float)


@pytest.mark.parametrize("num_predict", [-1, -2, 0, 2**31, 5e9])
def test_unlimited_num_predict_is_omitted(num_predict: int) -> None:
    # Ollama's runner stops at num_predict only when it is > 0; beyond llama-server's 32 bits it is no limit either
    assert "max_tokens" not in chat_to_backend(chat(options={"num_predict": num_predict})).body


@pytest.mark.parametrize("options", [{"num_predict": 1e300}, {"num_predict": 10**23}, {"top_k": 2**31},
                                     {"num_keep": -(2**40)}])
def test_integer_options_out_of_range_get_400(options: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as info:
        chat_to_backend(chat(options=options))
    assert info.value.status == 400 and "out of range" in info.value.message


def test_a_seed_is_an_unsigned_32_bit_number() -> None:
    assert chat_to_backend(chat(options={"seed": 2**40 + 5})).body["seed"] == 5
    assert chat_to_backend(chat(options={"seed": -1})).body["seed"] == 2**32 - 1


def test_tools_default_to_functions_and_need_a_name() -> None:
    fn = {"name": "f", "parameters": {"type": "object", "properties": {}}}
    body = chat_to_backend(chat(tools=[{"function": fn}])).body
    assert body["tools"] == [{"type": "function", "function": fn}]
    for bad in ({"type": "function"}, {"function": {"parameters": {}}}, {"function": {"name": ""}}):
        with pytest.raises(ApiError) as info:
            chat_to_backend(chat(tools=[bad]))
        assert info.value.status == 400 and info.value.param == "tools[0].function.name"
    for kind in ("bogus", 3):  # (llama-server's 500 "Unsupported tool type": the openai client retried it)
        with pytest.raises(ApiError) as info:
            chat_to_backend(chat(tools=[{"type": kind, "function": fn}]))
        assert info.value.status == 400 and info.value.param == "tools[0].type"


def test_option_details() -> None:
    body = chat_to_backend(
        chat(options={"top_k": 40.0, "stop": "END", "temperature": None, "seed": 7.9})
    ).body
    assert body["top_k"] == 40 and isinstance(body["top_k"], int)
    assert body["stop"] == ["END"]
    assert "temperature" not in body
    assert body["seed"] == 7  # Ollama truncates numbers given to integer options


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"temperature": "hot"}, "options.temperature"),
        ({"top_k": "40"}, "options.top_k"),
        ({"num_predict": True}, "options.num_predict"),
        ({"stop": [1]}, "options.stop"),
        ([], "options"),
        ("x", "options"),
    ],
)
def test_bad_options(options: Any, param: str) -> None:
    with pytest.raises(ApiError) as info:
        chat_to_backend(chat(options=options))
    assert info.value.status == 400 and info.value.param == param
    assert param in info.value.message


def test_format() -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    assert chat_to_backend(chat(format="json")).body["response_format"] == {"type": "json_object"}
    assert chat_to_backend(chat(format=schema)).body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"schema": schema},
    }
    assert "response_format" not in chat_to_backend(chat(format="")).body
    with pytest.raises(ApiError) as info:
        chat_to_backend(chat(format="yaml"))
    assert info.value.param == "format"


def test_images_are_refused() -> None:
    req = chat()
    req["messages"][0]["images"] = ["iVBORw0KGgo="]
    with pytest.raises(ApiError) as info:
        chat_to_backend(req)
    assert info.value.status == 400 and "does not support images" in info.value.message
    assert chat_to_backend(chat(messages=[{"role": "user", "content": "x", "images": None}]))
    with pytest.raises(ApiError):
        generate_to_backend({"model": "m", "prompt": "x", "images": ["aGk="]})


def test_tools_and_tool_call_history() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "22C", "tool_name": "get_weather"},
    ]
    body = chat_to_backend({"model": "m", "messages": messages, "tools": tools}).body
    assert body["tools"] == tools
    call = body["messages"][1]["tool_calls"][0]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert msgspec.json.decode(call["function"]["arguments"]) == {"city": "Paris"}
    assert body["messages"][2] == {"role": "tool", "content": "22C", "name": "get_weather"}


@pytest.mark.parametrize("extra", [{"system": "Be brief."}, {"template": "{{ .Prompt }}"}, {"context": [1, 2]}])
def test_raw_mode_refuses_template_system_and_context(extra: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as info:
        generate_to_backend({"model": "m", "prompt": "x", "raw": True, **extra})
    assert info.value.status == 400 and "raw mode does not support" in info.value.message


def test_generate_templated_and_raw() -> None:
    req = generate_to_backend(
        {"model": "m", "prompt": "Why?", "system": "Be brief.", "options": {"num_predict": 3}}
    )
    assert req.path == "/v1/chat/completions" and req.stream
    assert req.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why?"},
    ]
    assert req.body["max_tokens"] == 3
    raw = generate_to_backend(
        {"model": "m", "prompt": "<|im_start|>", "raw": True, "stream": False, "format": "json"}
    )
    assert raw.path == "/v1/completions" and not raw.stream
    assert raw.body["prompt"] == "<|im_start|>" and "messages" not in raw.body
    assert raw.body["json_schema"] == {"type": "object"} and "response_format" not in raw.body
    ignored = generate_to_backend(
        {"model": "m", "prompt": "x", "suffix": "y", "template": "t", "context": [1, 2]}
    )
    assert ignored.body["messages"] == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("req", "kind", "expected"),
    [
        ({"model": "m"}, "chat", True),
        ({"model": "m", "messages": []}, "chat", True),
        ({"model": "m", "messages": None}, "chat", True),
        ({"model": "m", "messages": [{"role": "user", "content": ""}]}, "chat", False),
        ({"model": "m"}, "generate", True),
        ({"model": "m", "prompt": ""}, "generate", True),
        ({"model": "m", "prompt": " "}, "generate", False),
        ({"model": "m", "keep_alive": 0}, "generate", True),
        ("not an object", "chat", False),
    ],
)
def test_is_load_only(req: Any, kind: str, expected: bool) -> None:
    assert is_load_only(req, kind) is expected


def test_load_response() -> None:
    chat_obj = load_response("m", "chat", "load")
    assert chat_obj["message"] == {"role": "assistant", "content": ""}
    assert chat_obj["done"] is True and chat_obj["done_reason"] == "load"
    gen_obj = load_response("m", "generate", "unload")
    assert gen_obj["response"] == "" and gen_obj["done_reason"] == "unload"
    assert RFC3339.match(gen_obj["created_at"])
    validate_with_ollama_client(chat_obj, "chat")
    validate_with_ollama_client(gen_obj, "generate")


@pytest.mark.parametrize(
    ("req", "param"),
    [
        ([], None),
        ({"messages": []}, "model"),
        ({"model": "", "messages": []}, "model"),
        ({"model": 3, "messages": []}, "model"),
        ({"model": "m", "messages": {}}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content"),
        ({"model": "m", "messages": [], "stream": "yes"}, "stream"),
        ({"model": "m", "messages": [], "keep_alive": "forever"}, "keep_alive"),
        ({"model": "m", "messages": [], "tools": {"a": 1}}, "tools"),
    ],
)
def test_chat_validation_errors(req: Any, param: str | None) -> None:
    with pytest.raises(ApiError) as info:
        chat_to_backend(req)
    assert info.value.status == 400 and info.value.param == param


def test_created_at_format() -> None:
    assert created_at(1_691_176_965_499_127_000) == "2023-08-04T19:22:45.499127Z"
    assert created_at(1_691_176_965_000_000_000) == "2023-08-04T19:22:45Z"
    assert created_at(1_691_176_965_000_000_001) == "2023-08-04T19:22:45.000000001Z"
    assert RFC3339.match(created_at())


def test_ollama_error_body() -> None:
    assert ollama_error_body(ApiError(400, "model is required")) == {
        "error": "model is required (llama-runner)"
    }
    assert ollama_error_body(ApiError(500, "slot unavailable", source="backend")) == {
        "error": "slot unavailable (backend)"
    }


# --- responses: recorded llama-server output ---------------------------------------------------


def check_final(final: dict[str, Any], kind: str, timings: dict[str, Any]) -> None:
    assert final["done"] is True and final["done_reason"] in ("stop", "length")
    for key in STATS:
        assert isinstance(final[key], int) and not isinstance(final[key], bool), key
        assert final[key] >= 0
    # the whole prompt, cached tokens included, as Ollama counts it
    assert final["prompt_eval_count"] == timings["prompt_n"] + timings["cache_n"]
    assert final["eval_count"] == timings["predicted_n"]
    assert final["prompt_eval_duration"] == round(timings["prompt_ms"] * 1_000_000)
    assert final["eval_duration"] == round(timings["predicted_ms"] * 1_000_000)
    assert RFC3339.match(final["created_at"])
    if kind == "chat":
        assert final["message"] == {"role": "assistant", "content": ""}
    else:
        assert final["response"] == ""
    validate_with_ollama_client(final, kind)


@pytest.mark.parametrize(
    ("fixture", "kind"),
    [("chat_stream.txt", "chat"), ("chat_stream.txt", "generate"), ("completions_stream.txt", "generate")],
)
def test_stream_from_recorded_llama_server(fixture: str, kind: str) -> None:
    chunks = golden_chunks(fixture)
    stream = OllamaStream(
        "smollm2:135m", kind, started_ns=START, load_ns=1234, clock=clock_at(START + 9_000_000)
    )
    objects = [obj for chunk in chunks for obj in stream.feed(chunk)]
    final = stream.finish()
    assert objects, "the recorded stream has text"
    text = ""
    for obj in objects:
        assert obj["done"] is False and obj["model"] == "smollm2:135m"
        assert RFC3339.match(obj["created_at"])
        if kind == "chat":
            assert obj["message"]["role"] == "assistant"
            assert obj["message"]["content"] != ""
            text += obj["message"]["content"]
        else:
            assert obj["response"] != ""
            text += obj["response"]
        validate_with_ollama_client(obj, kind)
    expected = "".join(
        (c["choices"][0].get("delta", {}).get("content") or c["choices"][0].get("text") or "")
        for c in chunks
        if c.get("choices")
    )
    assert text == expected
    timings = next(c["timings"] for c in reversed(chunks) if c.get("timings"))
    check_final(final, kind, timings)
    assert final["total_duration"] == 9_000_000 and final["load_duration"] == 1234
    assert final["done_reason"] == ("length" if final["eval_count"] >= 12 else "stop")
    assert msgspec.json.encode(objects + [final])  # NDJSON-ready


def test_non_stream_chat_from_recorded_llama_server() -> None:
    body = golden_json("chat.json")
    obj = chat_response("smollm2:135m", body, started_ns=START, clock=clock_at(START + 5))
    assert obj["model"] == "smollm2:135m"
    assert obj["message"]["role"] == "assistant"
    assert obj["message"]["content"] == body["choices"][0]["message"]["content"] != ""
    check_final({**obj, "message": {"role": "assistant", "content": ""}}, "chat", body["timings"])
    assert obj["total_duration"] == 5
    validate_with_ollama_client(obj, "chat")


@pytest.mark.parametrize("fixture", ["chat.json", "completions.json"])
def test_non_stream_generate_from_recorded_llama_server(fixture: str) -> None:
    body = golden_json(fixture)
    obj = generate_response("smollm2:135m", body, started_ns=START, clock=clock_at(START))
    choice = body["choices"][0]
    assert obj["response"] == (choice["message"]["content"] if "message" in choice else choice["text"]) != ""
    check_final({**obj, "response": ""}, "generate", body["timings"])
    validate_with_ollama_client(obj, "generate")


def test_streamed_and_non_streamed_replies_agree() -> None:
    """Same seed, temperature 0: the recorded streamed text equals the recorded full reply."""
    for stream_name, json_name, kind in (
        ("chat_stream.txt", "chat.json", "chat"),
        ("completions_stream.txt", "completions.json", "generate"),
    ):
        stream = OllamaStream("m", kind, started_ns=0)
        objs = [o for c in golden_chunks(stream_name) for o in stream.feed(c)]
        text = "".join(o["message"]["content"] if kind == "chat" else o["response"] for o in objs)
        choice = golden_json(json_name)["choices"][0]
        assert text == (choice["message"]["content"] if kind == "chat" else choice["text"])


# --- responses: synthetic cases ----------------------------------------------------------------


def delta_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "object": "chat.completion.chunk",
    }


def test_stream_tool_call_fragments_become_one_ollama_tool_call() -> None:
    stream = OllamaStream("m", "chat", started_ns=0, clock=clock_at(10))
    out = stream.feed(delta_chunk({"role": "assistant", "content": None}))
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    out += stream.feed(delta_chunk({"tool_calls": [call]}))
    out += stream.feed(delta_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}))
    out += stream.feed(delta_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}))
    out += stream.feed(delta_chunk({}, "tool_calls"))
    assert len(out) == 1
    assert out[0]["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    final = stream.finish()
    assert final["done_reason"] == "stop" and "tool_calls" not in final["message"]
    validate_with_ollama_client(out[0], "chat")


def test_stream_reasoning_becomes_thinking_and_empty_deltas_are_skipped() -> None:
    stream = OllamaStream("m", "chat", started_ns=0)
    assert stream.feed(delta_chunk({"content": ""})) == []
    assert stream.feed({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == []
    out = stream.feed(delta_chunk({"reasoning_content": "hmm"}))
    assert out[0]["message"] == {"role": "assistant", "content": "", "thinking": "hmm"}
    gen = OllamaStream("m", "generate", started_ns=0)
    assert gen.feed(delta_chunk({"reasoning_content": "hmm"}))[0]["thinking"] == "hmm"


def test_usage_is_the_fallback_without_timings() -> None:
    stream = OllamaStream("m", "generate", started_ns=0, clock=clock_at(7))
    stream.feed({"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}]})
    stream.feed({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    final = stream.finish()
    assert (final["prompt_eval_count"], final["eval_count"], final["eval_duration"]) == (3, 4, 0)
    assert final["done_reason"] == "length" and final["total_duration"] == 7


def test_backend_error_in_stream_and_reply() -> None:
    err = {
        "error": {
            "code": 400,
            "message": "the request exceeds the context size",
            "type": "exceed_context_size_error",
        }
    }
    with pytest.raises(ApiError) as info:
        OllamaStream("m", "chat", started_ns=0).feed(err)
    assert info.value.status == 400 and info.value.source == "backend"
    assert info.value.code == "exceed_context_size_error"
    with pytest.raises(ApiError) as info:
        chat_response("m", {"error": "boom"}, started_ns=0)
    assert info.value.status == 500 and info.value.source == "backend"
    with pytest.raises(ApiError) as info:
        generate_response("m", ["not", "an", "object"], started_ns=0)
    assert info.value.status == 502


def test_non_stream_tool_calls() -> None:
    body = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}},
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
    }
    obj = chat_response("m", body, started_ns=0)
    assert obj["message"]["content"] == ""
    assert obj["message"]["tool_calls"] == [
        {"function": {"name": "f", "arguments": {"x": 1}}},
        {"function": {"name": "g", "arguments": {"value": "not json"}}},
    ]
    assert obj["done_reason"] == "stop"
    validate_with_ollama_client(obj, "chat")


# --- any JSON in, only ApiError(400) out --------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
wrongish = json_values | st.sampled_from(["", "json", "5m", "-1", "0", "user", -1, 0, 1.5, [], {}, [""]])
messages_ish = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "assistant", "system", "tool"]) | wrongish,
            "content": st.text(max_size=10) | wrongish,
            "images": st.just([]) | wrongish,
            "tool_calls": st.lists(st.fixed_dictionaries({"function": json_values}), max_size=2) | wrongish,
            "tool_name": wrongish,
        },
    )
    | json_values,
    max_size=3,
)
options_ish = st.dictionaries(
    st.sampled_from(
        ["num_predict", "temperature", "top_k", "top_p", "seed", "stop", "mirostat", "num_ctx", "x"]
    ),
    wrongish,
    max_size=5,
)
request_ish = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=8) | wrongish,
        "messages": messages_ish | wrongish,
        "prompt": st.text(max_size=8) | wrongish,
        "system": wrongish,
        "raw": st.booleans() | wrongish,
        "stream": st.booleans() | wrongish,
        "options": options_ish | wrongish,
        "format": st.sampled_from(["json", "", {"type": "object"}]) | wrongish,
        "keep_alive": st.sampled_from(["5m", 0, -1, "1h30m"]) | wrongish,
        "tools": st.lists(st.dictionaries(st.text(max_size=4), json_values, max_size=2), max_size=2)
        | wrongish,
        "images": wrongish,
        "suffix": wrongish,
    },
)


def only_api_400(fn, value: Any) -> BackendRequest | None:
    try:
        result = fn(value)
    except ApiError as err:
        assert err.status == 400, err
        assert err.message
        return None
    assert isinstance(result, BackendRequest)
    msgspec.json.encode(result.body)
    return result


@settings(max_examples=100, deadline=None)
@given(value=json_values | request_ish)
def test_any_json_gives_a_request_or_a_400(value: Any) -> None:
    for fn in (chat_to_backend, generate_to_backend):
        result = only_api_400(fn, value)
        if result is not None:
            assert result.body["stream"] is result.stream
    for kind in ("chat", "generate"):
        assert isinstance(is_load_only(value, kind), bool)
    try:
        parse_keep_alive(value)
    except ApiError as err:
        assert err.status == 400


valid_options = st.fixed_dictionaries(
    {},
    optional={
        "num_predict": st.integers(-2, 4096),
        "temperature": st.floats(0, 2),
        "top_k": st.integers(0, 100),
        "top_p": st.floats(0, 1),
        "seed": st.integers(-1, 2**32),
        "stop": st.lists(st.text(max_size=5), max_size=3),
        "num_ctx": st.integers(1, 8192),
    },
)
valid_chat = st.fixed_dictionaries(
    {
        "model": st.text(min_size=1, max_size=10),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=20)}
            ),
            max_size=4,
        ),
    },
    optional={
        "stream": st.booleans(),
        "options": valid_options,
        "format": st.sampled_from(["json", {"type": "object", "properties": {"a": {"type": "string"}}}]),
        "keep_alive": st.sampled_from(["5m", "0", -1, 30, "1h30m"]),
    },
)


@settings(max_examples=100, deadline=None)
@given(req=valid_chat)
def test_valid_chat_requests_translate(req: dict[str, Any]) -> None:
    out = chat_to_backend(req)
    assert out.path == "/v1/chat/completions"
    assert out.stream is req.get("stream", True)
    assert [m["content"] for m in out.body["messages"]] == [m["content"] for m in req["messages"]]
    msgspec.json.encode(out.body)


@settings(max_examples=100, deadline=None)
@given(
    model=st.text(min_size=1, max_size=10),
    prompt=st.text(max_size=20),
    raw=st.booleans(),
    stream=st.booleans(),
    options=valid_options,
)
def test_valid_generate_requests_translate(
    model: str, prompt: str, raw: bool, stream: bool, options: dict
) -> None:
    out = generate_to_backend(
        {"model": model, "prompt": prompt, "raw": raw, "stream": stream, "options": options}
    )
    assert out.path == ("/v1/completions" if raw else "/v1/chat/completions")
    assert out.stream is stream
    msgspec.json.encode(out.body)


chunk_ish = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "index": st.just(0) | json_values,
                    "delta": st.fixed_dictionaries(
                        {},
                        optional={
                            "content": st.text(max_size=5) | json_values,
                            "tool_calls": st.lists(json_values, max_size=2) | json_values,
                            "reasoning_content": json_values,
                        },
                    )
                    | json_values,
                    "text": json_values,
                    "finish_reason": st.sampled_from(["stop", "length", "tool_calls"]) | json_values,
                },
            )
            | json_values,
            max_size=2,
        )
        | json_values,
        "timings": st.dictionaries(
            st.sampled_from(["prompt_n", "prompt_ms", "predicted_n", "predicted_ms"]), json_values
        )
        | json_values,
        "usage": json_values,
    },
)


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(chunk_ish | json_values, max_size=5), kind=st.sampled_from(["chat", "generate"]))
def test_stream_survives_any_chunks(chunks: list[Any], kind: str) -> None:
    stream = OllamaStream("m", kind, started_ns=0, clock=clock_at(1))
    objects = []
    for chunk in chunks:
        try:
            objects.extend(stream.feed(chunk))
        except ApiError as err:  # only a chunk carrying an "error" may raise
            assert isinstance(chunk, dict) and chunk.get("error") is not None and err.source == "backend"
    objects.append(stream.finish())
    msgspec.json.encode(objects)
    assert all(o["done"] is False for o in objects[:-1]) and objects[-1]["done"] is True
    for obj in objects:
        validate_with_ollama_client(obj, kind)


@settings(max_examples=100, deadline=None)
@given(body=chunk_ish | json_values)
def test_non_stream_reply_survives_any_body(body: Any) -> None:
    for fn in (chat_response, generate_response):
        try:
            obj = fn("m", body, started_ns=0)
        except ApiError as err:
            assert err.source == "backend"
            continue
        msgspec.json.encode(obj)


def _without_time(lines: bytes) -> list[dict[str, Any]]:
    out = []
    for line in lines.splitlines():
        obj = msgspec.json.decode(line)
        assert RFC3339.match(obj.pop("created_at"))
        out.append(obj)
    return out


SPECIAL_CHUNKS: list[dict[str, Any]] = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
    {"choices": [{"index": 0, "delta": {"reasoning_content": "let me think"}}]},
    {"choices": [{"index": 0, "delta": {"content": "é \"quoted\" \n\u2028 ok"}}]},
    {"choices": [{"index": 1, "delta": {"content": "second answer: dropped"}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"ci"}}]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "ty\":\"Paris\"}"}}]}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    # plain text chunks with escapes, an empty one, and one carrying timings (timings_per_token)
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": 'a \\ "b" \u00e9\t'}}], "created": 1},
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": "x"}}], "created": 1,
     "timings": {"prompt_n": 5, "prompt_ms": 1.5, "predicted_n": 9, "predicted_ms": 20.0, "cache_n": 0}},
    {"choices": [{"text": " t\"x", "index": 0, "logprobs": None, "finish_reason": None}], "created": 1},
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": ""}}], "created": 1},
]


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=20),
       fixture=st.sampled_from(["chat_stream.txt", "completions_stream.txt"]),
       kind=st.sampled_from(["chat", "generate"]), special=st.booleans())
def test_feed_raw_is_feed(cuts: list[int], fixture: str, kind: Any, special: bool) -> None:
    """The hot path (typed decoding, templated lines) answers exactly what the dict path answers, for the recorded
    streams cut anywhere, and for the chunks it hands over to the dict path (thinking, tool calls, other choices)."""
    chunks = golden_chunks(fixture) + (SPECIAL_CHUNKS if special else [])
    raw, _ = _events(chunks)
    points = sorted({c % (len(raw) + 1) for c in cuts} | {len(raw)})
    _assert_answers_like_the_dict_path(chunks, kind, raw, points, lambda s, parser, b: s.feed_raw(parser.feed(b)))


def test_feed_raw_odd_payloads_in_a_batch() -> None:
    """A batch is decoded in one call; a payload that is not one chunk object sends the batch one by one, and the
    lines are those of the good chunks, in order."""
    good = [b'{"choices":[{"index":0,"delta":{"content":"%d"}}]}' % i for i in range(3)]
    for odd in (b"not json", b'{"choices":[]},{"choices":[]}', b"", b'{"choices":"x"}', b"[1,2]"):
        stream = OllamaStream("m", "chat", started_ns=START)
        got = _without_time(stream.feed_raw([good[0], odd, good[1], good[2]]))
        assert [o["message"]["content"] for o in got] == ["0", "1", "2"], odd


def test_feed_raw_error_chunk_raises() -> None:
    stream = OllamaStream("m", "chat", started_ns=START)
    with pytest.raises(ApiError) as err:
        stream.feed_raw([b'{"error":{"code":500,"message":"slot unavailable","type":"server_error"}}'])
    assert err.value.source == "backend" and "slot unavailable" in err.value.message


# plain text deltas in llama-server's layout whose content the whole-buffer path must refuse or copy exactly
LAYOUT_CHUNKS: list[dict[str, Any]] = [
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": c}}], "created": 7, "id": "x",
     "model": "m", "system_fingerprint": "b", "object": "chat.completion.chunk"}
    for c in ("ends in a backslash \\", "nul \u0000 and \u2028", "tab\t", "", 'q"uote', "back\\\\slashes", "é")
] + [
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": "other request"}}], "created": 8,
     "id": "y", "model": "m", "system_fingerprint": "b", "object": "chat.completion.chunk"},
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": "x"}}], "created": 8, "id": "y",
     "model": "m", "system_fingerprint": "b", "object": "chat.completion.chunk",
     "timings": {"prompt_n": 1, "prompt_ms": 1.0, "predicted_n": 2, "predicted_ms": 3.0, "cache_n": 0}},
    {"choices": [{"text": "plain", "index": 0, "logprobs": None, "finish_reason": None}], "created": 8,
     "model": "m", "system_fingerprint": "b", "object": "text_completion", "id": "z"},
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": "a", "reasoning_content": "b"}}],
     "created": 8, "id": "y", "model": "m", "system_fingerprint": "b", "object": "chat.completion.chunk"},
]


def _events(chunks: list[dict[str, Any]]) -> tuple[bytes, list[int]]:
    events = [b"data: " + msgspec.json.encode(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]
    ends, at = [], 0
    for e in events:
        at += len(e)
        ends.append(at)
    return b"".join(events), ends


def _assert_answers_like_the_dict_path(chunks: list[dict[str, Any]], kind: Any, raw: bytes, points: list[int],
                                       feed: Callable[[OllamaStream, SSEParser, bytes], bytes]) -> None:
    """``raw`` (the events of ``chunks``) fed through ``feed`` in pieces ending at ``points`` gives the lines, and
    the final object, that the dict path gives for ``chunks``."""
    by_dict = OllamaStream("m", kind, started_ns=START, clock=clock_at(START + 5))
    expected = b"".join(msgspec.json.encode(o) + b"\n" for c in chunks for o in by_dict.feed(c))
    fast = OllamaStream("m", kind, started_ns=START, clock=clock_at(START + 5))
    parser = SSEParser()
    got, last = b"", 0
    for p in points:
        got += feed(fast, parser, raw[last:p])
        last = p
    assert parser.done
    assert _without_time(got) == _without_time(expected)
    final, final_dict = fast.finish(), by_dict.finish()
    final.pop("created_at"), final_dict.pop("created_at")
    assert final == final_dict


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=10),
       at_events=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
       fixture=st.sampled_from(["chat_stream.txt", "completions_stream.txt"]),
       kind=st.sampled_from(["chat", "generate"]), extra=st.sampled_from(["none", "special", "layout"]))
def test_feed_sse_is_feed(cuts: list[int], at_events: list[int], fixture: str, kind: Any, extra: str) -> None:
    """The whole-buffer path (runs of whole plain text events, literals copied) answers exactly what the dict path
    answers: recorded streams cut anywhere and at event boundaries (where that path applies), with the chunks
    it must refuse (quotes, a trailing backslash, timings, another request's fields, thinking, tool calls)."""
    chunks = golden_chunks(fixture) + {"none": [], "special": SPECIAL_CHUNKS, "layout": LAYOUT_CHUNKS}[extra]
    raw, ends = _events(chunks)
    points = sorted({c % (len(raw) + 1) for c in cuts} | {ends[i % len(ends)] for i in at_events} | {len(raw)})
    _assert_answers_like_the_dict_path(chunks, kind, raw, points, lambda s, parser, b: s.feed_sse(parser, b))


def _count_decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the batches that reach the decoding path (``feed_raw``) from now on."""
    decoded: list[int] = []
    real = OllamaStream.feed_raw

    def spy(self: OllamaStream, payloads: list[bytes]) -> bytes:
        decoded.append(len(payloads))
        return real(self, payloads)

    monkeypatch.setattr(OllamaStream, "feed_raw", spy)
    return decoded


@pytest.mark.parametrize("fixture", ["chat_stream.txt", "completions_stream.txt"])
def test_feed_sse_takes_the_whole_buffer_path_for_plain_text(fixture: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first event (the parser's start), runs of llama-server's plain text events never reach the
    decoding path: the hot path is real, not a fallback that always runs."""
    chunks = golden_chunks(fixture)
    plain = [c for c in chunks[1:] if c["choices"] and not c["choices"][0].get("finish_reason")]
    assert len(plain) >= 5
    raw, _ = _events(plain)
    stream = OllamaStream("m", "chat", started_ns=START)
    parser = SSEParser()
    first_end = raw.index(b"\n\n") + 2
    stream.feed_sse(parser, raw[:first_end])
    decoded = _count_decoded(monkeypatch)
    body_end = raw.rindex(b"data: [DONE]")
    lines = stream.feed_sse(parser, raw[first_end:body_end])
    assert decoded == []

    def text(chunk: dict[str, Any]) -> str:
        choice = chunk["choices"][0]
        return str(choice["delta"]["content"] if "delta" in choice else choice["text"])

    assert [o["message"]["content"] for o in _without_time(lines)] == [t for t in map(text, plain[1:]) if t]


@pytest.mark.parametrize("chunk", LAYOUT_CHUNKS + SPECIAL_CHUNKS)
@pytest.mark.parametrize("run", [1, 3])
def test_feed_sse_one_run_of_whole_events(chunk: dict[str, Any], run: int) -> None:
    """Each odd chunk, alone or repeated, as a run of whole events (what the whole-buffer path looks at)."""
    start, _ = _events(golden_chunks("chat_stream.txt")[:1])
    body, _ = _events([chunk] * run)
    body = body[: -len(b"data: [DONE]\n\n")]
    by_dict = OllamaStream("m", "chat", started_ns=START, clock=clock_at(START + 5))
    expected = b"".join(msgspec.json.encode(o) + b"\n" for _ in range(run) for o in by_dict.feed(chunk))
    fast = OllamaStream("m", "chat", started_ns=START, clock=clock_at(START + 5))
    parser = SSEParser()
    fast.feed_sse(parser, start[: start.index(b"\n\n") + 2])
    assert _without_time(fast.feed_sse(parser, body)) == _without_time(expected)
    final, final_dict = fast.finish(), by_dict.finish()  # (the figures: a chunk's timings or usage counts)
    final.pop("created_at"), final_dict.pop("created_at")
    assert final == final_dict


@pytest.mark.parametrize("first_read", [b"", b": a comment starts the stream\n\n"])
@pytest.mark.parametrize("fixture", ["chat_stream.txt", "completions_stream.txt"])
def test_feed_sse_decodes_only_the_events_around_the_plain_run(fixture: str, first_read: bytes,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole recorded stream at once: its first event (the role) and its last ones (finish, usage) are decoded,
    the plain text deltas between them are not; the lines are the dict path's. Also when the stream's very first
    read holds it all (a short answer, or a fast one: most of the bytes of a busy server's streams)."""
    chunks = golden_chunks(fixture)
    raw, _ = _events(chunks)
    by_dict = OllamaStream("m", "chat", started_ns=START, clock=clock_at(START + 5))
    expected = b"".join(msgspec.json.encode(o) + b"\n" for c in chunks for o in by_dict.feed(c))
    decoded = _count_decoded(monkeypatch)
    stream = OllamaStream("m", "chat", started_ns=START, clock=clock_at(START + 5))
    parser = SSEParser()
    if first_read:
        assert stream.feed_sse(parser, first_read) == b""
    got = stream.feed_sse(parser, raw)
    assert _without_time(got) == _without_time(expected)
    plain = sum(1 for c in chunks if c["choices"] and not c["choices"][0].get("finish_reason")
                and (c["choices"][0].get("delta") or {}).get("role") is None)
    assert plain >= 5 and sum(decoded) <= len(chunks) - plain + 1


def test_think_is_validated_and_switches_thinking_off_and_on() -> None:
    """``think: true`` must reach the template too: a template whose thinking is off unless asked (llama-server
    renders it so by default) never thought for Ollama's ``think: true``."""
    assert "chat_template_kwargs" not in chat_to_backend(chat()).body
    assert chat_to_backend(chat(think=False)).body["chat_template_kwargs"] == {"enable_thinking": False}
    assert chat_to_backend(chat(think=True)).body["chat_template_kwargs"] == {"enable_thinking": True}
    assert chat_to_backend(chat(think="high")).body["chat_template_kwargs"] == {"enable_thinking": True,
                                                                                 "reasoning_effort": "high"}
    for bad in (42, "max", [True]):
        with pytest.raises(ApiError) as info:
            chat_to_backend(chat(think=bad))
        assert info.value.status == 400 and info.value.param == "think"


def test_drop_oldest_keeps_system_and_latest_messages() -> None:
    from gateway.ollama_translate import drop_oldest

    system = {"role": "system", "content": "be brief"}
    old = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} " + "x" * 100} for i in range(10)]
    last = {"role": "user", "content": "and now?"}
    fewer = drop_oldest([system, *old, last], prompt_tokens=3000, ctx=2048)
    assert fewer is not None and fewer[0] == system and fewer[-1] == last
    assert 2 < len(fewer) < 12 and fewer[1:-1] == old[12 - len(fewer):]  # the oldest went, in order
    # about 40% of the text had to go (3000 tokens to at most 90% of 2048)
    assert 0.3 < 1 - sum(len(m["content"]) for m in fewer) / sum(len(m["content"]) for m in [system, *old, last])
    assert drop_oldest([system, last], 3000, 2048) is None  # nothing left to drop
    assert drop_oldest([system, *old, last], 3000, 0) is None  # (the backend did not say its context)


def test_fit_to_context_cuts_the_front_of_a_lone_long_message_or_prompt() -> None:
    from gateway.ollama_translate import fit_to_context

    doc = "apple " * 2600 + "\nSummarize."
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": doc}]}
    out = fit_to_context(body, prompt_tokens=2636, ctx=2048)
    assert out is not None and out["messages"][0] == body["messages"][0]
    kept = out["messages"][1]["content"]
    assert kept.endswith("\nSummarize.") and len(kept) < 0.75 * len(doc)  # the end stays: the question
    raw = fit_to_context({"prompt": doc}, prompt_tokens=2636, ctx=2048)
    assert raw is not None and raw["prompt"].endswith("\nSummarize.") and len(raw["prompt"]) < len(doc)
    assert fit_to_context({"prompt": "short"}, prompt_tokens=2636, ctx=2048) is None
    # an input many times the context is cut too (one ten times it was not cut at all: a 400)
    huge = "The quick brown fox. " * 5000 + "\nSummarize."
    for prompt_tokens in (22260, 60000):
        cut = fit_to_context({"prompt": huge}, prompt_tokens=prompt_tokens, ctx=2048)
        assert cut is not None and cut["prompt"].endswith("\nSummarize.")
        assert len(cut["prompt"]) / len(huge) * prompt_tokens < 0.9 * 2048
    assert fit_to_context({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 2636, 2048) is None


def _sse(*contents: str) -> bytes:
    return b"".join(b"data: " + msgspec.json.encode(
        {"choices": [{"index": 0, "finish_reason": None, "delta": {"content": c}}], "object": "chat.completion.chunk"})
        + b"\n\n" for c in contents)


@pytest.mark.parametrize("chunks", [
    ["QQXYZ zebras are a", " breed"],  # as llama-server sends it: the prefill with the first token
    ["QQXYZ ", "zebras are", " a", " breed"],  # (in pieces)
])
def test_a_continued_chat_answers_only_what_is_new(chunks: list[str]) -> None:
    """A chat ending with an assistant message is continued; llama-server repeats that message at the start of
    its answer, Ollama does not (a client that appends the answer, Open WebUI's continue, doubled the text)."""
    from gateway.ollama_translate import chat_response
    from gateway.openai_translate import prefill

    req = {"messages": [{"role": "user", "content": "zebras?"}, {"role": "assistant", "content": "QQXYZ zebras are"}]}
    echo = prefill(req)
    assert echo == "QQXYZ zebras are" and prefill({"messages": [{"role": "user", "content": "x"}]}) == ""
    conv, parser = OllamaStream("m", "chat", 0, echo=echo), SSEParser()
    lines = [msgspec.json.decode(line) for c in chunks for line in conv.feed_sse(parser, _sse(c)).splitlines()]
    assert "".join(o["message"]["content"] for o in lines) == " a breed" and all(o["message"]["content"] for o in lines)
    after = OllamaStream("m", "chat", 0, echo=echo)  # the stream after: the fast paths again, text as it is
    after.feed_sse(parser, _sse("QQXYZ zebras are a"))
    assert b"QQXYZ" in after.feed_sse(SSEParser(), _sse("QQXYZ again"))
    body = {"choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant",
                                                                         "content": "QQXYZ zebras are a breed"}}]}
    assert chat_response("m", body, 0, echo=echo)["message"]["content"] == " a breed"
    body["choices"][0]["message"]["content"] = "Other text"  # (a backend that does not repeat it: as it is)
    assert chat_response("m", body, 0, echo=echo)["message"]["content"] == "Other text"


def test_a_system_prompt_longer_than_the_context_loses_its_beginning() -> None:
    """Ollama truncates it (the front of the prompt); it was a 400 (the latest message alone could not be cut)."""
    from gateway.ollama_translate import fit_to_context

    system = "You are a pirate. " * 800
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]}
    fitted = fit_to_context(body, prompt_tokens=4016, ctx=2048)
    assert fitted is not None
    kept = fitted["messages"][0]["content"]
    assert fitted["messages"][1] == {"role": "user", "content": "hi"} and system.endswith(kept)
    assert 0 < len(kept) < len(system) * 0.5
