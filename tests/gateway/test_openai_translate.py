"""OpenAI / LM Studio requests -> llama-server (gateway/openai_translate.py), and OpenAI-shaped errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ApiError, openai_error_body
from gateway.openai_translate import BackendRequest, chat_to_backend, completions_to_backend, rewrite_model
from gateway.sse import SSEParser

GOLDEN = Path(__file__).parent / "golden"


def test_chat_passes_everything_through() -> None:
    req = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "seed": 42,
        "max_tokens": 12,
        "top_k": 40,  # llama.cpp-specific fields too
        "mirostat": 2,
        "cache_prompt": False,
        "n_probs": 3,
        "response_format": {"type": "json_object"},
    }
    out = chat_to_backend(req)
    assert out == BackendRequest("/v1/chat/completions", req, True)
    assert out.body is not req  # the caller's dict is not modified


def test_chat_content_parts_and_tool_messages_pass() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "type": "function", "function": {}}],
        },
        {"role": "tool", "tool_call_id": "1", "content": "42"},
    ]
    out = chat_to_backend({"model": "", "messages": messages})
    assert out.body["messages"] == messages and out.stream is False


def test_what_openai_and_llama_server_take_passes() -> None:
    ok = chat_to_backend({"model": "m", "max_tokens": -1, "logit_bias": {"15": -100, "-1": 2.5}, "messages": [
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],  # (was a 400: an unknown part)
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    assert ok.body["messages"][3]["content"] == [{"type": "text", "text": "no"}]  # (what llama-server reads)
    assert chat_to_backend({"model": "m", "messages": [{"role": "user"}], "logit_bias": [[15, -1]]})  # llama.cpp's


def test_max_completion_tokens_becomes_max_tokens() -> None:
    out = chat_to_backend({"model": "m", "messages": [{"role": "user"}], "max_completion_tokens": 7})
    assert out.body["max_tokens"] == 7 and "max_completion_tokens" not in out.body
    # both sent: the current name wins over the deprecated one (as llama-server itself reads them)
    both = chat_to_backend(
        {"model": "m", "messages": [{"role": "user"}], "max_completion_tokens": 7, "max_tokens": 40}
    )
    assert both.body["max_tokens"] == 7


def test_media_content_parts_are_named_for_the_model_check() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    text = {"type": "text", "text": "what is this?"}
    assert chat_to_backend({"model": "m", "messages": [{"role": "user", "content": [text]}]}).media == ""
    assert chat_to_backend({"model": "m", "messages": [{"role": "user", "content": [text, image]}]}).media == "image_url"
    assert chat_to_backend({"model": "m", "messages": [{"role": "user", "content": [audio]}]}).media == "input_audio"


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "text"}, "messages[0].content[0].text"),
        ({"type": "text", "text": 3}, "messages[0].content[0].text"),
        ({"text": "no type"}, "messages[0].content[0]"),
        ("just a string", "messages[0].content[0]"),
        ({"type": "video", "video": {}}, "messages[0].content[0].type"),
    ],
)
def test_bad_content_parts_get_400(part: Any, param: str) -> None:
    with pytest.raises(ApiError) as e:
        chat_to_backend({"model": "m", "messages": [{"role": "user", "content": [part]}]})
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize(
    ("req", "param"),
    [
        ({"messages": [{"role": "user"}]}, "model"),
        ({"model": None, "messages": [{"role": "user"}]}, "model"),
        ({"model": 1, "messages": [{"role": "user"}]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user"}], "stream": "true"}, "stream"),
        ({"model": "m", "messages": [{"role": "user"}], "max_tokens": "12"}, "max_tokens"),
        (
            {"model": "m", "messages": [{"role": "user"}], "max_completion_tokens": 1.5},
            "max_completion_tokens",
        ),
        ({"model": "m", "messages": [{"role": "user"}], "temperature": "0"}, "temperature"),
        ({"model": "m", "messages": [{"role": "user"}], "stop": [1]}, "stop"),
        ({"model": "m", "messages": [{"role": "user"}], "tools": {}}, "tools"),
        ({"model": "m", "messages": [{"role": "user"}], "response_format": "json"}, "response_format"),
        # OpenAI's 400s that llama-server answered with a 500 ("Failed to parse tools") or took as they were
        ({"model": "m", "messages": [{"role": "user"}], "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"model": "m", "messages": [{"role": "user"}], "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "m", "messages": [{"role": "user"}], "tools": [{"type": "function", "function": {"name": ""}}]},
         "tools[0].function.name"),
        ({"model": "m", "messages": [{"role": "user"}], "functions": [{"description": "x"}]}, "functions[0].name"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages[0].name"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
        ({"model": "m", "messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user"}], "temperature": 5}, "temperature"),
        ({"model": "m", "messages": [{"role": "user"}], "temperature": -1}, "temperature"),
        ({"model": "m", "messages": [{"role": "user"}], "top_p": 2}, "top_p"),
        ({"model": "m", "messages": [{"role": "user"}], "presence_penalty": 5}, "presence_penalty"),
        ({"model": "m", "messages": [{"role": "user"}], "top_logprobs": 30}, "top_logprobs"),
        ({"model": "m", "messages": [{"role": "user"}], "max_tokens": 10**12}, "max_tokens"),  # (wrapped: -727379968)
        ({"model": "m", "messages": [{"role": "user"}], "n": 2**40}, "n"),
        ({"model": "m", "messages": [{"role": "user"}], "n": 0}, "n"),
        ({"model": "m", "messages": [{"role": "user"}], "logit_bias": "x"}, "logit_bias"),
        ({"model": "m", "messages": [{"role": "user"}], "logit_bias": {"abc": -100}}, "logit_bias"),
        ({"model": "m", "messages": [{"role": "user"}], "logit_bias": {"15": 500}}, "logit_bias"),
        ({"model": "m", "messages": [{"role": "user"}], "response_format": {"type": "json_schema"}},
         "response_format.json_schema"),
        ({"model": "m", "messages": [{"role": "user"}], "response_format": {"type": "xml"}}, "response_format.type"),
        ({"model": "m", "messages": [{"role": "user"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_chat_validation(req: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as info:
        chat_to_backend(req)
    assert info.value.status == 400 and info.value.param == param
    assert param.split("[")[0] in info.value.message


def test_completions() -> None:
    for prompt in ("Once upon a time", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        req = {"model": "m", "prompt": prompt, "max_tokens": 12, "stream": True, "n_predict": 5}
        out = completions_to_backend(req)
        assert out == BackendRequest("/v1/completions", req, True)
    for bad in (None, 5, [], [None], [True], {"a": 1}):
        with pytest.raises(ApiError) as info:
            completions_to_backend({"model": "m", "prompt": bad})
        assert info.value.param is not None and info.value.param.startswith("prompt")
    with pytest.raises(ApiError):
        completions_to_backend({"prompt": "x"})


def test_rewrite_model() -> None:
    chunk = {"id": "x", "model": "smollm2", "choices": []}
    assert rewrite_model(chunk, "gpt-4o-mini")["model"] == "gpt-4o-mini"
    err = {"error": {"message": "x"}}
    assert rewrite_model(err, "m") == {"error": {"message": "x"}}


@pytest.mark.parametrize("fixture", ["chat.json", "completions.json"])
def test_rewrite_model_on_recorded_replies(fixture: str) -> None:
    body = msgspec.json.decode((GOLDEN / fixture).read_bytes())
    assert rewrite_model(body, "client-name")["model"] == "client-name"


@pytest.mark.parametrize("fixture", ["chat_stream.txt", "completions_stream.txt"])
def test_rewrite_model_on_recorded_streams(fixture: str) -> None:
    parser = SSEParser()
    for payload in parser.feed((GOLDEN / fixture).read_bytes()):
        chunk = rewrite_model(msgspec.json.decode(payload), "client-name")
        assert chunk["model"] == "client-name"
    assert parser.done


def test_openai_error_body() -> None:
    assert openai_error_body(ApiError(404, "model 'x' not found", param="model")) == {
        "error": {
            "message": "model 'x' not found (llama-runner)",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    # an unknown path is not an unknown model (OpenAI's own answer has no code)
    assert openai_error_body(ApiError(404, "path /v1/nothing not found"))["error"]["code"] is None
    bad = openai_error_body(ApiError(400, "invalid stream: must be a boolean", param="stream"))["error"]
    assert bad["type"] == "invalid_request_error" and bad["code"] is None and bad["param"] == "stream"
    backend = openai_error_body(ApiError(500, "failed to decode", code="backend_error", source="backend"))[
        "error"
    ]
    assert backend == {
        "message": "failed to decode (backend)",
        "type": "server_error",
        "param": None,
        "code": "backend_error",
    }
    assert openai_error_body(ApiError(503, "loading"))["error"]["type"] == "server_error"


def test_openai_client_parses_our_error_body() -> None:
    openai = pytest.importorskip("openai")
    import httpx

    body = openai_error_body(ApiError(404, "model 'nope' not found", param="model"))
    response = httpx.Response(404, json=body, request=httpx.Request("POST", "http://x/v1/chat/completions"))
    client = openai.OpenAI(api_key="x", base_url="http://x/v1")
    err = client._make_status_error_from_response(response)
    assert isinstance(err, openai.NotFoundError)
    assert err.code == "model_not_found" and "(llama-runner)" in err.message


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
wrongish = json_values | st.sampled_from(["", "user", -1, 0, 1.5, [], {}, [""], True])
request_ish = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=8) | wrongish,
        "messages": st.lists(
            st.fixed_dictionaries({}, optional={"role": st.just("user") | wrongish, "content": wrongish})
            | json_values,
            max_size=3,
        )
        | wrongish,
        "prompt": st.text(max_size=8)
        | st.lists(st.text(max_size=4) | st.integers(0, 10**6), max_size=3)
        | wrongish,
        "stream": st.booleans() | wrongish,
        "stream_options": wrongish,
        "max_tokens": st.integers(-1, 100) | wrongish,
        "max_completion_tokens": st.integers(-1, 100) | wrongish,
        "temperature": st.floats(0, 2) | wrongish,
        "stop": st.lists(st.text(max_size=3), max_size=2) | wrongish,
        "tools": wrongish,
        "response_format": wrongish,
        "logprobs": wrongish,
    },
)


@settings(max_examples=200, deadline=None)
@given(value=json_values | request_ish)
def test_any_json_gives_a_request_or_a_400(value: Any) -> None:
    for fn in (chat_to_backend, completions_to_backend):
        try:
            out = fn(value)
        except ApiError as err:
            assert err.status == 400 and err.message and err.param != ""
            continue
        assert isinstance(out, BackendRequest) and isinstance(out.body, dict)
        assert out.stream is bool(out.body.get("stream"))
        msgspec.json.encode(out.body)
    if isinstance(value, dict):
        rewritten = rewrite_model(dict(value), "m")
        assert "error" in value or rewritten["model"] == "m"


valid_chat = st.fixed_dictionaries(
    {
        "model": st.text(max_size=10),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=20)}
            ),
            min_size=1,
            max_size=4,
        ),
    },
    optional={
        "stream": st.booleans(),
        "max_completion_tokens": st.integers(0, 4096),
        "temperature": st.floats(0, 2),
        "seed": st.integers(-1, 2**32),
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
        "cache_prompt": st.booleans(),
    },
)


@settings(max_examples=100, deadline=None)
@given(req=valid_chat)
def test_valid_chat_requests_pass(req: dict[str, Any]) -> None:
    out = chat_to_backend(req)
    expected = dict(req)
    if "max_completion_tokens" in expected:
        expected["max_tokens"] = expected.pop("max_completion_tokens")
    assert out.body == expected and out.stream is req.get("stream", False)
    msgspec.json.encode(out.body)


# --------------------------------------------------------------------------- the Responses API
def test_responses_text_format_becomes_the_grammar_llama_server_reads() -> None:
    """text.format was passed on as it came and llama-server ignored it: no JSON, responses.parse failed."""
    from gateway.openai_translate import responses_to_backend

    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    b = responses_to_backend({"model": "m", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "person", "schema": schema, "strict": True}}})
    assert b.path == "/v1/responses" and b.body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    assert responses_to_backend({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}}
                                ).body["response_format"] == {"type": "json_object"}
    assert "response_format" not in responses_to_backend({"model": "m", "input": "x",
                                                          "text": {"format": {"type": "text"}}}).body


def test_responses_easy_messages_are_completed_for_llama_server() -> None:
    """An assistant's content as a string (OpenAI's EasyInputMessage) was llama-server's 400 "Cannot determine type
    of 'item'"; the request's own objects are not changed."""
    from gateway.openai_translate import responses_to_backend

    said = {"role": "assistant", "content": "Hi Bob!"}
    req = {"model": "m", "input": [{"role": "user", "content": "I am Bob."}, said,
                                   {"type": "function_call_output", "call_id": "c", "output": "21C"}]}
    items = responses_to_backend(req).body["input"]
    assert items[0] == {"type": "message", "role": "user", "content": "I am Bob."}
    assert items[1] == {"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": "Hi Bob!", "annotations": []}]}
    assert items[2]["type"] == "function_call_output" and said == {"role": "assistant", "content": "Hi Bob!"}


@pytest.mark.parametrize(("req", "param"), [
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, "input[0].content[0].text"),
    ({"input": [{"role": "bogus", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "x", "text": "json"}, "text"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
])
def test_responses_bad_requests_are_400_naming_the_field(req: dict[str, Any], param: str) -> None:
    """They were llama-server's 500s ("Failed to parse messages/tools"), counted as server errors."""
    from gateway.openai_translate import responses_to_backend

    with pytest.raises(ApiError) as err:
        responses_to_backend({"model": "m", **req})
    assert err.value.status == 400 and err.value.param == param, err.value.message


RESPONSES_SSE = (
    b'event: response.created\ndata: {"type":"response.created","response":{"id":"r1","status":"in_progress"}}\n\n'
    b'event: response.output_item.added\ndata: {"type":"response.output_item.added","item":{"type":"message"}}\n\n'
    b'event: response.content_part.added\ndata: {"type":"response.content_part.added","part":{"text":""}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"H\xc3\xa9"}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"llo"}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r1","model":"smollm2"}}\n\n'
)


def test_a_responses_stream_gets_the_indices_the_sdk_reads_in_any_pieces() -> None:
    from gateway.openai_translate import ResponsesStream

    def events(out: bytes) -> list[tuple[str, dict[str, Any]]]:
        blocks = [b.split(b"\n") for b in out.split(b"\n\n") if b]
        return [(e.decode()[7:], msgspec.json.decode(d[6:])) for e, d in blocks]

    conv = ResponsesStream("alias", created=1700000000)
    whole = conv.feed(RESPONSES_SSE) + conv.flush()
    evs = events(whole)
    assert [name for name, _ in evs] == [d["type"] for _, d in evs]  # (named events stay named)
    assert [d["sequence_number"] for _, d in evs] == list(range(6))
    assert [(d.get("output_index"), d.get("content_index")) for _, d in evs] == [
        (None, None), (0, None), (0, 0), (0, 0), (0, 0), (None, None)]
    assert evs[3][1]["delta"] == "Hé" and evs[-1][1]["response"]["model"] == "alias"
    # the response skeleton the openai SDK 2.x builds its snapshot from (its output None crashed .stream)
    assert evs[0][1]["response"] == {"id": "r1", "status": "in_progress", "object": "response",
                                     "created_at": 1700000000, "model": "alias", "output": []}
    for cut in range(1, len(RESPONSES_SSE), 7):
        conv = ResponsesStream("alias", created=1700000000)
        assert conv.feed(RESPONSES_SSE[:cut]) + conv.feed(RESPONSES_SSE[cut:]) + conv.flush() == whole


FUNCTION_CALL_SSE = (
    b'event: response.created\ndata: {"type":"response.created","response":{"id":"r2","status":"in_progress"}}\n\n'
    b'event: response.output_item.added\ndata: {"type":"response.output_item.added","item":{"type":"function_call",'
    b'"id":"fc_1","call_id":"c1","name":"get_time","arguments":""}}\n\n'
    b'event: response.function_call_arguments.delta\ndata: {"type":"response.function_call_arguments.delta",'
    b'"item_id":"fc_1","delta":"{\\"tz\\""}\n\n'
    b'event: response.function_call_arguments.delta\ndata: {"type":"response.function_call_arguments.delta",'
    b'"item_id":"fc_1","delta":": \\"UTC\\"}"}\n\n'
    b'event: response.output_item.done\ndata: {"type":"response.output_item.done","item":{"type":"function_call",'
    b'"id":"fc_1","call_id":"c1","name":"get_time","arguments":"{\\"tz\\": \\"UTC\\"}"}}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r2","status":"completed",'
    b'"usage":{"input_tokens":3,"output_tokens":2,"total_tokens":5}}}\n\n'
)


def test_a_responses_stream_says_a_function_calls_arguments_are_done_and_fills_the_response_fields() -> None:
    """OpenAI sends function_call_arguments.done (the whole arguments) before the item's done (llama-server did
    not); response objects carry the request's tools, instructions... and usage details (the SDK read None)."""
    from gateway.openai_translate import ResponsesStream, response_fields

    req = {"model": "m", "input": "x", "instructions": "Be brief.", "tools": [{"type": "function", "name": "f"}]}
    conv = ResponsesStream("m", created=1, fields=response_fields(req))
    out = conv.feed(FUNCTION_CALL_SSE) + conv.flush()
    evs = [(b.split(b"\n")[0].decode()[7:], msgspec.json.decode(b.split(b"\n")[1][6:]))
           for b in out.split(b"\n\n") if b]
    assert [name for name, _ in evs] == [
        "response.created", "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    done = evs[4][1]
    assert done["arguments"] == '{"tz": "UTC"}' and done["item_id"] == "fc_1" and done["output_index"] == 0
    assert [d["sequence_number"] for _, d in evs] == list(range(7))
    for _, d in (evs[0], evs[-1]):
        assert d["response"]["tools"] == req["tools"] and d["response"]["instructions"] == "Be brief."
        assert d["response"]["tool_choice"] == "auto" and d["response"]["parallel_tool_calls"] is True
        assert d["response"]["error"] is None and d["response"]["text"] == {"format": {"type": "text"}}
    assert evs[-1][1]["response"]["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}
    again = ResponsesStream("m", created=1)  # (a done sent by the backend is not sent twice)
    with_done = FUNCTION_CALL_SSE.replace(
        b'event: response.output_item.done', b'event: response.function_call_arguments.done\ndata: {"type":'
        b'"response.function_call_arguments.done","item_id":"fc_1","arguments":"{}"}\n\nevent: response.output_item.done')
    assert (again.feed(with_done) + again.flush()).count(b"arguments.done") == 2  # (event name and type: once)


def _chunk(index: int, text: str = "x") -> dict[str, Any]:
    return {"choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}


def test_several_choices_begin_in_order_and_n_has_one_usage_last() -> None:
    """llama-server's tasks send their chunks as they come: choice 1 could begin first (the openai SDK's stream
    helpers failed: IndexError), several prompts began with a null, and every task of n sent its usage."""
    from gateway.openai_translate import ChoiceStream, several_choices

    assert several_choices({"n": 2}) and several_choices({"prompt": ["a", "b"]})
    assert several_choices({"prompt": [[1], [2]]}) and not several_choices({"prompt": [1, 2]})
    assert not several_choices({"n": 1}) and not several_choices({"prompt": ["a"]})
    s = ChoiceStream()
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    out: list[Any] = []
    for doc in [None, _chunk(1, "a"), _chunk(2, "p"), _chunk(1, "b"), usage, _chunk(0, "c"), _chunk(2, "q"),
                _chunk(0, "d"),
                {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}]:
        out += s.push(doc)
    out += s.finish()
    texts = [(d["choices"][0]["index"], d["choices"][0]["delta"]["content"]) for d in out if d["choices"]]
    assert texts[0] == (0, "c")
    firsts = [next(i for i, (k, _) in enumerate(texts) if k == n) for n in range(3)]
    assert firsts == sorted(firsts)  # (every choice begins after the ones before it)
    assert sorted(texts) == sorted([(1, "a"), (2, "p"), (1, "b"), (0, "c"), (2, "q"), (0, "d")])
    assert [t for k, t in texts if k == 1] == ["a", "b"] and [t for k, t in texts if k == 2] == ["p", "q"]
    assert out[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert sum(1 for d in out if not d["choices"]) == 1
    assert ChoiceStream().push({"error": {"message": "x"}}) == [{"error": {"message": "x"}}]


def test_a_named_tool_choice_becomes_required_among_that_tool_alone() -> None:
    """llama-server reads tool_choice's strings only: an object was ignored (the model called another tool)."""
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("a", "b")]
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": tools}
    body = chat_to_backend({**base, "tool_choice": {"type": "function", "function": {"name": "b"}}}).body
    assert body["tool_choice"] == "required" and body["tools"] == [tools[1]]
    assert chat_to_backend({**base, "tool_choice": "auto"}).body["tools"] == tools
    for bad, param in (({"type": "function", "function": {"name": "c"}}, "tool_choice.function.name"),
                       ({"type": "function"}, "tool_choice.function.name"), ({"type": "x"}, "tool_choice.type"),
                       ("sometimes", "tool_choice"), (3, "tool_choice")):
        with pytest.raises(ApiError) as err:
            chat_to_backend({**base, "tool_choice": bad})
        assert err.value.status == 400 and err.value.param == param, bad
    with pytest.raises(ApiError) as err:
        chat_to_backend({"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"})
    assert err.value.param == "tool_choice" and "tools" in err.value.message
    from gateway.openai_translate import responses_to_backend

    rtools = [{"type": "function", "name": n, "parameters": {"type": "object"}} for n in ("a", "b")]
    body = responses_to_backend({"model": "m", "input": "x", "tools": rtools,
                                 "tool_choice": {"type": "function", "name": "a"}}).body
    assert body["tool_choice"] == "required" and body["tools"] == [rtools[0]]


def test_responses_top_logprobs_needs_no_switch_the_api_does_not_have() -> None:
    """llama-server answered 'top_logprobs requires logprobs to be set to true': the Responses API has no logprobs."""
    from gateway.openai_translate import responses_to_backend

    assert responses_to_backend({"model": "m", "input": "x", "top_logprobs": 2}).body["logprobs"] is True
    assert "logprobs" not in responses_to_backend({"model": "m", "input": "x"}).body
    with pytest.raises(ApiError):
        responses_to_backend({"model": "m", "input": "x", "top_logprobs": 50})


def test_a_responses_stream_cut_by_an_error_ends_as_the_responses_api_says_it() -> None:
    """An error event then response.failed (it came as a chat completion's error chunk)."""
    from gateway.openai_translate import ResponsesStream

    conv = ResponsesStream("m", created=1)
    out = conv.feed(FUNCTION_CALL_SSE.split(b"event: response.output_item.added")[0])
    out += conv.feed(b'data: {"error":{"code":500,"message":"boom","type":"server_error"}}\n\n')
    out += conv.failed({"message": "cut", "type": "server_error", "param": None, "code": "shutting_down"})
    evs = [(b.split(b"\n")[0].decode()[7:], msgspec.json.decode(b.split(b"\n")[1][6:]))
           for b in out.split(b"\n\n") if b]
    assert [name for name, _ in evs] == ["response.created", "error", "response.failed", "error", "response.failed"]
    assert [d["sequence_number"] for _, d in evs] == list(range(5))
    assert evs[1][1]["message"] == "boom" and evs[4][1]["response"]["status"] == "failed"
    assert evs[4][1]["response"]["id"] == "r2" and evs[4][1]["response"]["error"]["code"] == "shutting_down"
    assert all(name == d["type"] for name, d in evs)


def test_llama_cpps_n_probs_and_legacy_logprobs_are_bounded() -> None:
    """n_probs 49152 answered 47 MB and left llama-server 700 MB bigger (75 MB a token): a memory bomb."""
    for req, param in (({"model": "m", "messages": [{"role": "user", "content": "x"}], "n_probs": 49152}, "n_probs"),
                       ({"model": "m", "prompt": "x", "logprobs": 49152}, "logprobs")):
        with pytest.raises(ApiError) as err:
            (chat_to_backend if "messages" in req else completions_to_backend)(req)
        assert err.value.status == 400 and err.value.param == param
    assert completions_to_backend({"model": "m", "prompt": "x", "logprobs": 5}).body["logprobs"] == 5


def test_responses_truncation_takes_openais_values_only() -> None:
    """'bogus' was answered 200 and echoed."""
    from gateway.openai_translate import responses_to_backend

    for ok in ("auto", "disabled"):
        responses_to_backend({"model": "m", "input": "x", "truncation": ok})
    with pytest.raises(ApiError) as err:
        responses_to_backend({"model": "m", "input": "x", "truncation": "bogus"})
    assert err.value.param == "truncation"


def test_reasoning_effort_reaches_the_template_as_ollamas_think_does() -> None:
    def body(**extra: Any) -> dict[str, Any]:
        return chat_to_backend({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}).body

    assert "chat_template_kwargs" not in body()
    assert body(reasoning_effort="none")["chat_template_kwargs"] == {"enable_thinking": False}
    assert body(reasoning_effort="high")["chat_template_kwargs"] == {"enable_thinking": True,
                                                                     "reasoning_effort": "high"}
    own = {"enable_thinking": False}
    assert body(reasoning_effort="high", chat_template_kwargs=own)["chat_template_kwargs"] == own
    for bad in ("bogus", 3, True):
        with pytest.raises(ApiError) as err:
            body(reasoning_effort=bad)
        assert err.value.status == 400 and err.value.param == "reasoning_effort"
