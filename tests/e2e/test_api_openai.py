"""OpenAI and LM Studio APIs (port 1234) on the real system, with the real `openai` client and raw HTTP."""

from __future__ import annotations

import base64
import json
import math
import urllib.error
import urllib.request

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import System

pytestmark = pytest.mark.e2e
MODEL = "smollm2"
EMBED = "smollm2-embed"
MSG = [{"role": "user", "content": "Say hello."}]


def client(system: System) -> openai.OpenAI:
    return openai.OpenAI(base_url=system.openai_url, api_key="lm-studio", max_retries=0)


def base(system: System) -> str:
    return f"http://127.0.0.1:{system.openai_port}"


def http(method: str, url: str, body: object | None = None, raw: bytes | None = None
         ) -> tuple[int, dict, dict[str, str]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


# --------------------------------------------------------------------------- OpenAI
def test_models_list_and_retrieve(system: System) -> None:
    c = client(system)
    assert [m.id for m in c.models.list()] == [MODEL, EMBED, "whisper-tiny.en"]
    m = c.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model" and m.owned_by
    assert c.models.retrieve("smollm2-135m-instruct").id == "smollm2-135m-instruct"  # an alias
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"
    assert isinstance(err.value.body, dict) and "no-such-model" in err.value.body["message"]


def test_stream_include_usage_reports_usage_last(system: System) -> None:
    chunks = list(client(system).chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].choices == []
    assert all(ch.usage is None for ch in chunks[:-1])


def test_max_completion_tokens_limits_the_answer(system: System) -> None:
    r = client(system).chat.completions.create(model=MODEL, messages=MSG, max_completion_tokens=3)
    assert r.usage is not None and r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_response_format_json_schema(system: System) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"],
              "additionalProperties": False}
    r = client(system).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give a JSON object with a name."}], max_tokens=60,
        temperature=0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    doc = json.loads(r.choices[0].message.content or "")
    assert isinstance(doc["name"], str)


def test_logprobs_pass_through(system: System) -> None:
    # temperature 0: a sampled token can be half a UTF-8 character, for which llama-server sends no logprobs
    r = client(system).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, logprobs=True,
                                               top_logprobs=2, temperature=0)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content and len(lp.content[0].top_logprobs) == 2, r


def test_tools_for_a_model_without_them_are_a_400(system: System) -> None:
    """llama-server ignores tools for a model whose chat template takes none: a plain answer came back where a tool
    call was asked for ("required" too), silently. Said instead, as on the Ollama port."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    with pytest.raises(openai.BadRequestError) as err:
        client(system).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool],  # type: ignore[list-item]
            tool_choice="required", max_tokens=20)
    assert "does not support tools" in err.value.message and err.value.param == "tools"


def test_embeddings_float_and_base64(system: System) -> None:
    c = client(system)
    r = c.embeddings.create(model=EMBED, input=["hello", "world"])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 576
    assert r.model == EMBED and r.usage.prompt_tokens > 0
    # asked for explicitly, the client hands base64 over as is (it asks for base64 itself by default)
    b64 = c.embeddings.create(model=EMBED, input="hello", encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(str(b64.data[0].embedding)), dtype="<f4").tolist()
    assert decoded == pytest.approx(r.data[0].embedding, abs=1e-5)
    short = c.embeddings.create(model=EMBED, input="hello", dimensions=32)
    v = short.data[0].embedding
    assert len(v) == 32 and abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4
    tokens = c.embeddings.create(model=EMBED, input=[[28120, 905]])
    assert len(tokens.data[0].embedding) == 576


def test_embeddings_on_a_chat_model_is_400(system: System) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(system).embeddings.create(model=MODEL, input="hello")
    assert "does not support embeddings" in str(err.value)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": MSG, "temperature": "hot"}, "temperature"),
    ({"model": 7, "messages": MSG}, "model"),
])
def test_invalid_requests_are_400_in_openai_shape(system: System, body: dict, param: str) -> None:
    status, doc, _ = http("POST", system.openai_url + "/chat/completions", body)
    assert status == 400
    err = doc["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and "(llama-runner)" in err["message"]


def test_image_and_audio_parts_are_400_for_a_text_model(system: System) -> None:
    # llama-server answers 500 (which the openai client retries twice); the gateway refuses them first
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    with pytest.raises(openai.BadRequestError) as err:
        client(system).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}])
    assert "does not take image_url content parts" in str(err.value)
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    for url in (system.openai_url + "/chat/completions", base(system) + "/api/v0/chat/completions",
                system.ollama_url + "/v1/chat/completions"):
        status, doc, _ = http("POST", url, {"model": MODEL, "messages": [{"role": "user", "content": [audio]}]})
        assert status == 400 and doc["error"]["param"] == "messages", (url, doc)
    status, doc, _ = http("POST", system.openai_url + "/chat/completions",
                          {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text"}]}]})
    assert status == 400 and doc["error"]["param"] == "messages[0].content[0].text"


def test_default_model_answers_a_request_without_model(system: System) -> None:
    status, doc, _ = http("POST", system.openai_url + "/chat/completions", {"messages": MSG, "max_tokens": 2})
    assert status == 200 and doc["choices"][0]["message"]["role"] == "assistant"
    # embeddings without a model: the embedding model (the default one chats: it was a 400 "does not support")
    status, doc, _ = http("POST", system.openai_url + "/embeddings", {"input": "Some text"})
    assert status == 200 and len(doc["data"][0]["embedding"]) == 576 and doc["model"] == EMBED, doc
    # Ollama's port keeps OpenAI's rule: model is required
    status, doc, _ = http("POST", system.ollama_url + "/v1/chat/completions", {"messages": MSG})
    assert status == 400 and doc["error"]["param"] == "model"


def test_too_large_body_is_413_in_openai_shape(system: System) -> None:
    status, doc, _ = http("POST", system.openai_url + "/chat/completions", raw=b" " * (33 * 1024 * 1024))
    assert status == 413 and doc["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404_model_not_found(system: System) -> None:
    status, doc, _ = http("POST", system.openai_url + "/chat/completions", {"model": "nope", "messages": MSG})
    assert status == 404 and doc["error"]["code"] == "model_not_found"


# --------------------------------------------------------------------------- LM Studio REST API v0
def test_v0_models(system: System) -> None:
    client(system).chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)  # loaded now
    status, doc, _ = http("GET", base(system) + "/api/v0/models")
    assert status == 200 and doc["object"] == "list"
    by_id = {m["id"]: m for m in doc["data"]}
    m = by_id[MODEL]
    assert m == {"id": MODEL, "object": "model", "type": "llm", "publisher": "HuggingFaceTB", "arch": "llama",
                 "compatibility_type": "gguf", "quantization": "Q4_1", "state": "loaded",
                 "max_context_length": 8192, "loaded_context_length": 2048, "capabilities": []}
    assert by_id[EMBED]["type"] == "embeddings"
    status, one, _ = http("GET", base(system) + f"/api/v0/models/{MODEL}")
    assert status == 200 and one == m
    status, err, _ = http("GET", base(system) + "/api/v0/models/nope")
    assert status == 404 and err["error"]["code"] == "model_not_found"


def test_v0_chat_completions_has_stats(system: System) -> None:
    status, doc, _ = http("POST", base(system) + "/api/v0/chat/completions",
                          {"model": MODEL, "messages": MSG, "max_tokens": 4})
    assert status == 200 and doc["object"] == "chat.completion" and doc["model"] == MODEL
    s = doc["stats"]
    assert s["tokens_per_second"] > 0 and s["time_to_first_token"] > 0 and s["generation_time"] > 0
    assert s["stop_reason"] == "maxPredictedTokensReached"
    assert doc["model_info"] == {"arch": "llama", "quant": "Q4_1", "format": "gguf", "context_length": 2048}
    assert doc["runtime"]["supported_formats"] == ["gguf"]


def test_v0_completions_default_model_and_stream_stats(system: System) -> None:
    status, doc, _ = http("POST", base(system) + "/api/v0/completions", {"prompt": "The sky is", "max_tokens": 3})
    assert status == 200 and doc["object"] == "text_completion" and doc["stats"]["generation_time"] > 0
    with httpx.stream("POST", base(system) + "/api/v0/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": MSG, "max_tokens": 3, "stream": True}) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["stats"]["stop_reason"] == "maxPredictedTokensReached" and last["model_info"]["arch"] == "llama"


def test_v0_embeddings(system: System) -> None:
    status, doc, _ = http("POST", base(system) + "/api/v0/embeddings", {"model": EMBED, "input": "Some text"})
    assert status == 200 and doc["object"] == "list" and len(doc["data"][0]["embedding"]) == 576


def test_responses_api_with_the_openai_client(system: System) -> None:
    """OpenAI's Responses API (`client.responses.create`, what new OpenAI code uses), as LM Studio serves it."""
    c = client(system)
    r = c.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0)
    assert r.output_text and r.usage is not None and 0 < r.usage.output_tokens <= 8
    assert r.model == MODEL and r.status in ("completed", "incomplete")
    aliased = c.responses.create(model="smollm2-135m-instruct", input="Hi", max_output_tokens=2)
    assert aliased.model == "smollm2-135m-instruct"  # (answered under the name asked for)
    kinds: list[str] = []
    text = ""
    with c.responses.create(model=MODEL, instructions="Be brief.", max_output_tokens=8, stream=True,
                            input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}]
                            ) as stream:
        for ev in stream:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                text += ev.delta
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert text and "response.output_text.delta" in kinds


def test_responses_stream_helper_structured_output_and_a_conversation(system: System) -> None:
    """The SDK's responses.stream crashed (events without output_index/content_index); text.format was ignored
    (no JSON; responses.parse failed); an assistant's string content was llama-server's 400."""
    c = client(system)
    with c.responses.stream(model="smollm2-135m-instruct", input="Say hello.", max_output_tokens=6) as stream:
        deltas = [ev.delta for ev in stream if ev.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas and final.output_text == "".join(deltas) and final.model == "smollm2-135m-instruct"
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = c.responses.create(model=MODEL, input="Make up a person.", max_output_tokens=40, temperature=0,
                           text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    person = json.loads(r.output_text)
    assert isinstance(person["name"], str) and isinstance(person["age"], int), r.output_text
    r = c.responses.create(model=MODEL, max_output_tokens=8, input=[
        {"role": "user", "content": "My name is Bob."}, {"role": "assistant", "content": "Hi Bob!"},
        {"role": "user", "content": "What is my name?"}])
    assert r.output_text


def test_responses_continue_a_stored_response_by_previous_response_id(system: System) -> None:
    """LM Studio's (and OpenAI's) stateful Responses API: ``previous_response_id`` continues a stored response,
    streamed or not, which GET/DELETE /v1/responses/{id} read and remove (llama-server refused the field: 400)."""
    c = client(system)
    first = c.responses.create(model=MODEL, input="My name is Bob. Say hi.", max_output_tokens=8, temperature=0)
    second = c.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                max_output_tokens=8, temperature=0)
    alone = c.responses.create(model=MODEL, input="What is my name?", max_output_tokens=8, temperature=0)
    assert second.previous_response_id == first.id and alone.previous_response_id is None
    assert first.usage and second.usage and alone.usage
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens, (first, second, alone)
    with c.responses.stream(model=MODEL, input="I am 40.", previous_response_id=second.id,
                            max_output_tokens=4) as stream:
        for _ in stream:
            pass
        third = stream.get_final_response()
    assert third.usage and third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    assert c.responses.retrieve(third.id).output_text == third.output_text
    items = list(c.responses.input_items.list(third.id))  # (the request's own input, not the earlier turns)
    assert [(i.type, i.role, i.content[0].text) for i in items] == [("message", "user", "I am 40.")]  # type: ignore[union-attr]
    assert items[0].id.startswith("msg_")
    c.responses.delete(third.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(third.id)
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model=MODEL, input="Hi", previous_response_id=third.id, max_output_tokens=2)
    assert err.value.code == "previous_response_not_found" and third.id in str(err.value)
    unstored = c.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)
    status, doc, _ = http("POST", base(system) + "/v1/responses", {"model": MODEL, "input": "Hi", "store": "yes"})
    assert status == 400 and doc["error"]["param"] == "store", doc


def test_responses_api_bad_requests_are_400(system: System) -> None:
    c = client(system)
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model=MODEL, input=[])
    assert "input" in str(err.value)
    status, doc, _ = http("POST", base(system) + "/v1/responses", {"model": MODEL})
    assert status == 400 and doc["error"]["param"] == "input"
    status, doc, _ = http("POST", base(system) + "/v1/responses", {
        "model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]})
    assert status == 400 and "image" in doc["error"]["message"], doc  # (a text-only model: before llama-server)


def test_legacy_completions_logprobs_and_echo_in_openais_shape(system: System) -> None:
    """The openai client reads legacy logprobs as tokens / token_logprobs / top_logprobs / text_offset (all were
    None: llama-server sends the chat shape) and echo puts the prompt first (llama-server ignored it)."""
    c = client(system)
    r = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, logprobs=2, echo=True, temperature=0)
    choice = r.choices[0]
    assert r.id.startswith("cmpl-") and choice.text.startswith("Once upon")
    lp = choice.logprobs
    assert lp is not None and lp.tokens and len(lp.tokens) == len(lp.token_logprobs or []) == len(lp.top_logprobs or [])
    assert lp.text_offset and lp.text_offset[0] == len("Once upon") and all(len(t) <= 3 for t in lp.top_logprobs or [])
    assert all(tok in top for tok, top in zip(lp.tokens, lp.top_logprobs or [], strict=True))  # (the sampled one too)
    assert choice.text == "Once upon" + "".join(lp.tokens)
    chunks = list(c.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, logprobs=1, stream=True,
                                       temperature=0))
    tokens = [t for ch in chunks for choice in ch.choices if choice.logprobs for t in choice.logprobs.tokens or []]
    assert "".join(tokens) == "".join(lp.tokens)


def test_several_choices_and_prompts_stream_as_the_openai_client_reads_them(system: System) -> None:
    """Several prompts streamed began with `data: null` (the client's chunk was None); n=2 in the SDK's stream
    helper; one usage chunk, last, with both choices' tokens (each task sent its own); legacy ids and echo on
    LM Studio's /api/v0/completions too (it sent the chat shape and ignored echo)."""
    c = client(system)
    chunks = list(c.completions.create(model=MODEL, prompt=["Once upon", "The sky"], max_tokens=3, stream=True))
    assert all(ch is not None and ch.id.startswith("cmpl-") for ch in chunks), chunks
    assert {choice.index for ch in chunks for choice in ch.choices} == {0, 1}
    with c.chat.completions.stream(model=MODEL, messages=MSG, n=2, max_tokens=4,
                                   stream_options={"include_usage": True}, extra_body={"ignore_eos": True}) as stream:
        events = [ev for ev in stream if ev.type == "chunk"]
    usages = [ev.chunk.usage for ev in events if ev.chunk.usage is not None]
    final = events[-1].snapshot  # (get_final_completion raises for a length-cut answer)
    assert [ch.index for ch in final.choices] == [0, 1] and all(ch.message.content for ch in final.choices)
    assert len(usages) == 1 and usages[0].completion_tokens == 8, usages
    status, doc, _ = http("POST", base(system) + "/api/v0/completions", {
        "model": MODEL, "prompt": "Hello", "max_tokens": 2, "logprobs": 2, "echo": True})
    assert status == 200 and doc["id"].startswith("cmpl-") and doc["choices"][0]["text"].startswith("Hello"), doc
    assert len(doc["choices"][0]["logprobs"]["tokens"]) == 2 and "stats" in doc, doc


def test_responses_carry_the_fields_openai_returns(system: System) -> None:
    """tools, instructions, tool_choice, usage details...: llama-server's response objects left them out (the
    SDK read None: `for t in r.tools` failed)."""
    c = client(system)
    r = c.responses.create(model=MODEL, input="Hi", instructions="Be brief.", max_output_tokens=3)
    assert r.tools == [] and r.instructions == "Be brief." and r.tool_choice == "auto" and r.parallel_tool_calls
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.max_output_tokens == 3 and r.error is None
    with c.responses.stream(model=MODEL, input="Hi", max_output_tokens=3) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.tools == [] and final.usage is not None and final.usage.output_tokens_details is not None
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=MSG, tool_choice="required")  # (no tools)
    assert err.value.param == "tool_choice" if hasattr(err.value, "param") else "tool_choice" in str(err.value)


def test_a_continued_chat_answers_only_what_is_new_on_every_openai_route(system: System) -> None:
    """The last message the assistant's (a prefill): llama-server repeats it first; Ollama's /v1 answers the new
    text only, and so do the LM Studio routes (a client appending the answer doubled it)."""
    import httpx

    msgs = [{"role": "user", "content": "Count from 1 to 10."}, {"role": "assistant", "content": "1, 2, 3, 4,"}]
    for base in (system.openai_url, system.ollama_url + "/v1"):
        c = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)  # type: ignore[arg-type]
        text = r.choices[0].message.content or ""
        assert text and not text.startswith("1, 2, 3, 4,"), (base, text)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=4, temperature=0, stream=True) if ch.choices)  # type: ignore[arg-type]
        assert streamed == text, (base, streamed, text)
    v0 = httpx.post(system.openai_url.removesuffix("/v1") + "/api/v0/chat/completions", timeout=60,
                    json={"model": MODEL, "messages": msgs, "max_tokens": 4, "temperature": 0}).json()
    assert v0["choices"][0]["message"]["content"] == text


def test_tools_for_a_model_without_them_are_a_400_on_the_responses_and_v0_routes(system: System) -> None:
    import httpx

    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(openai.BadRequestError) as err:
        client(system).responses.create(model=MODEL, input="Weather?", tools=[tool])  # type: ignore[list-item]
    assert "does not support tools" in err.value.message
    r = httpx.post(system.openai_url.removesuffix("/v1") + "/api/v0/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}]})
    assert r.status_code == 400 and "does not support tools" in r.json()["error"]["message"]


def test_a_schema_llama_server_would_never_return_from_is_a_400_on_every_route(system: System) -> None:
    """minItems above maxItems: llama.cpp's grammar builder never returned and its memory grew ~270 MB/s (16 GB in
    75 s), every other request to the model hung, and a client's timeout did not stop it."""
    bad = {"type": "array", "minItems": 5, "maxItems": 2}
    msgs = [{"role": "user", "content": "hi"}]
    ollama_base = f"http://127.0.0.1:{system.ollama_port}"
    cases = [
        (base(system) + "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 4,
                                                 "response_format": {"type": "json_schema",
                                                                     "json_schema": {"name": "x", "schema": bad}}}),
        (base(system) + "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 4, "text": {
            "format": {"type": "json_schema", "name": "x", "schema": bad}}}),
        (base(system) + "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "json_schema": bad}),
        (base(system) + "/api/v0/chat/completions", {"model": MODEL, "messages": msgs, "grammar": 'root ::= "a"{5,2}'}),
        (ollama_base + "/api/chat", {"model": MODEL, "messages": msgs, "format": bad, "stream": False}),
        (ollama_base + "/v1/chat/completions", {"model": MODEL, "messages": msgs,
                                                "response_format": {"type": "json_schema",
                                                                    "json_schema": {"name": "x", "schema": bad}}}),
    ]
    for url, body in cases:
        r = httpx.post(url, json=body, timeout=20)
        assert r.status_code == 400 and "more" in r.text, (url, r.text)
    assert client(system).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2).choices  # (still serves)


def test_a_completions_suffix_for_a_model_that_cannot_insert_is_a_400_on_every_port(system: System) -> None:
    """Fill-in-the-middle: llama-server dropped the suffix and answered a plain continuation (an editor took it for
    the middle); Ollama refuses so on /api/generate and its /v1/completions, as OpenAI does."""
    with pytest.raises(openai.BadRequestError) as err:
        client(system).completions.create(model=MODEL, prompt="def add(a, b):\n", suffix="\nprint(add(1, 2))",
                                          max_tokens=4)
    assert "does not support insert" in str(err.value) and err.value.body["param"] == "suffix"  # type: ignore[index]
    for url in (system.ollama_url + "/v1/completions", base(system) + "/api/v0/completions"):
        status, doc, _ = http("POST", url, {"model": MODEL, "prompt": "x", "suffix": "y", "max_tokens": 2})
        assert status == 400 and "does not support insert" in doc["error"]["message"], (url, doc)
    assert client(system).completions.create(model=MODEL, prompt="x", suffix="", max_tokens=1).choices


def test_a_streamed_completions_usage_comes_as_openai_streams_it(system: System) -> None:
    """llama-server put usage on /v1/completions' last chunk, asked for or not: OpenAI sends it only with
    stream_options.include_usage, in a chunk of its own with no choices (as /v1/chat/completions did already)."""
    import httpx

    for url in (base(system) + "/v1/completions", system.ollama_url + "/v1/completions"):
        for include in (False, True):
            body: dict[str, object] = {"model": MODEL, "prompt": "a b c", "max_tokens": 3, "stream": True}
            if include:
                body["stream_options"] = {"include_usage": True}
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
            with_usage = [c for c in chunks if c.get("usage")]
            if include:
                assert with_usage == [chunks[-1]] and chunks[-1]["choices"] == [], chunks[-2:]
                assert chunks[-1]["usage"]["completion_tokens"] > 0 and chunks[-1]["id"].startswith("cmpl-")
            else:
                assert not with_usage, chunks[-1]
            assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)
    stream = client(system).completions.create(model=MODEL, prompt="a b c", max_tokens=3, stream=True,
                                               stream_options={"include_usage": True})
    last = list(stream)[-1]
    assert last.usage is not None and last.usage.completion_tokens > 0 and not last.choices


def test_reasoning_effort_is_checked_and_a_model_that_does_not_think_refuses_it(system: System) -> None:
    """llama-server ignored reasoning_effort: "bogus", or "low" for a model without thinking, were 200s (Ollama's
    /v1 maps it to think: an unknown value, or thinking for such a model, is a 400)."""
    for url in (base(system) + "/v1/chat/completions", system.ollama_url + "/v1/chat/completions"):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        status, doc, _ = http("POST", url, {**body, "reasoning_effort": "bogus"})
        assert status == 400 and doc["error"]["param"] == "reasoning_effort", doc
        status, doc, _ = http("POST", url, {**body, "reasoning_effort": "low"})
        assert status == 400 and "does not support thinking" in doc["error"]["message"], doc
        status, doc, _ = http("POST", url, {**body, "reasoning_effort": "none"})
        assert status == 200, doc
