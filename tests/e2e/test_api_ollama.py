"""Ollama's API beyond chat/generate, on the real system, with the real `ollama` client where it reaches."""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from http.client import HTTPConnection

import ollama
import openai
import pytest

from gateway.embed_routes import CHUNK
from tests.conftest import System

pytestmark = pytest.mark.e2e
MODEL = "smollm2"
EMBED = "smollm2-embed"
OPTS = {"num_predict": 4, "temperature": 0, "seed": 1}


def http(method: str, url: str, body: object | None = None) -> tuple[int, dict, dict[str, str]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_list_has_gguf_details(system: System) -> None:
    listed = ollama.Client(system.ollama_url).list().models
    assert [m.model for m in listed] == [MODEL + ":latest", EMBED + ":latest"]  # with their tag, as Ollama's
    models = {(m.model or "").removesuffix(":latest"): m for m in listed}
    d = models[MODEL].details
    assert d is not None
    assert (d.format, d.family, d.parameter_size, d.quantization_level) == ("gguf", "llama", "134.52M", "Q4_1")
    assert models[MODEL].size and models[MODEL].size > 50_000_000 and models[MODEL].modified_at


def test_show_reports_gguf_metadata_and_capabilities(system: System) -> None:
    c = ollama.Client(system.ollama_url)
    r = c.show(MODEL)
    assert r.details is not None and r.details.family == "llama" and r.details.families == ["llama"]
    assert r.details.quantization_level == "Q4_1" and r.details.parameter_size == "134.52M"
    info = r.modelinfo or {}
    assert info["general.architecture"] == "llama"
    assert info["llama.context_length"] == 8192 and info["llama.embedding_length"] == 576
    assert info["general.parameter_count"] == 134515008
    assert info["tokenizer.ggml.tokens"] == []  # long arrays hidden, as Ollama does without verbose
    assert r.capabilities == ["completion"]
    assert r.modified_at is not None and r.license == "apache-2.0"
    assert "num_ctx" in (r.parameters or "")
    assert c.show(f"{MODEL}:latest").details == r.details
    assert c.show(MODEL.upper()).details == r.details  # names match regardless of case, as Ollama's
    assert c.generate(model=MODEL.upper(), prompt="Hi", options=OPTS).done
    assert c.show(EMBED).capabilities == ["embedding"]


def test_show_unknown_model_is_404(system: System) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(system.ollama_url).show("no-such-model")
    assert err.value.status_code == 404 and "no-such-model" in err.value.error


def test_ps_lists_loaded_models_with_expiry(system: System) -> None:
    c = ollama.Client(system.ollama_url)
    c.generate(model=MODEL, prompt="Hi", options=OPTS, keep_alive="10m")
    models = {(m.model or "").removesuffix(":latest"): m for m in c.ps().models}
    assert MODEL in models
    m = models[MODEL]
    assert m.size and m.size > 50_000_000 and m.size_vram == 0 and m.context_length == 2048
    assert m.details is not None and m.details.quantization_level == "Q4_1"
    assert m.expires_at is not None
    left = (m.expires_at - datetime.now(UTC)).total_seconds()
    assert 300 < left <= 601
    # kept loaded (keep_alive -1): a far-future date, as Ollama shows it (not the model's idle TTL from now)
    c.generate(model=MODEL, prompt="", keep_alive=-1)
    try:
        kept = {(m.model or "").removesuffix(":latest"): m for m in c.ps().models}[MODEL]
        assert kept.expires_at is not None and kept.expires_at.year > 2300
    finally:
        c.generate(model=MODEL, prompt="", keep_alive="5m")


def test_embed_string_and_list(system: System) -> None:
    c = ollama.Client(system.ollama_url)
    one = c.embed(model=EMBED, input="Why is the sky blue?")
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 576
    assert abs(norm(one.embeddings[0]) - 1) < 1e-3
    assert one.prompt_eval_count and one.total_duration
    two = c.embed(model=EMBED, input=["Why is the sky blue?", "Why is the grass green?"])
    assert len(two.embeddings) == 2 and two.embeddings[0] == pytest.approx(one.embeddings[0], abs=1e-4)
    assert two.embeddings[0] != two.embeddings[1]


def test_embed_dimensions_truncates_and_normalizes(system: System) -> None:
    r = ollama.Client(system.ollama_url).embed(model=EMBED, input="hello", dimensions=64)
    assert len(r.embeddings[0]) == 64 and abs(norm(r.embeddings[0]) - 1) < 1e-4


def test_embed_truncate(system: System) -> None:
    long = "hello world " * 1500  # ~3000 tokens, over the 2048 context
    c = ollama.Client(system.ollama_url)
    r = c.embed(model=EMBED, input=long)
    assert len(r.embeddings[0]) == 576
    with pytest.raises(ollama.ResponseError) as err:
        c.embed(model=EMBED, input=long, truncate=False)
    assert err.value.status_code == 400 and "context length" in err.value.error
    # Ollama's /v1/embeddings truncates too (its /v1 runs through the same handler; here it was a 400); the LM
    # Studio port keeps OpenAI's 400. dimensions 0 on /api/embed is Ollama's "not set" (it was a 400)
    status, doc, _ = http("POST", system.ollama_url + "/v1/embeddings", {"model": EMBED, "input": long})
    assert status == 200 and len(doc["data"][0]["embedding"]) == 576, doc
    status, doc, _ = http("POST", f"http://127.0.0.1:{system.openai_port}/v1/embeddings",
                          {"model": EMBED, "input": long})
    assert status == 400 and doc["error"]["code"] == "context_length_exceeded", doc
    assert len(c.embed(model=EMBED, input="hi", dimensions=0).embeddings[0]) == 576


def test_a_client_leaving_a_big_embed_batch_frees_the_model_within_one_chunk(system: System) -> None:
    """llama-server finishes every input of a call it was given, client gone or not: a batch sent in one call kept
    the model busy for minutes after its client left, and the next request waited all that time."""
    c = ollama.Client(system.ollama_url, timeout=600)
    inputs = [f"sentence {i} about apples, rivers and stones in the north" for i in range(CHUNK * 12)]
    c.embed(model=EMBED, input="warm")
    t = time.monotonic()
    assert len(c.embed(model=EMBED, input=inputs[:CHUNK]).embeddings) == CHUNK
    one = time.monotonic() - t  # one call's worth
    conn = HTTPConnection("127.0.0.1", system.ollama_port, timeout=one * 1.5)
    conn.request("POST", "/api/embed", json.dumps({"model": EMBED, "input": inputs}),
                 {"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    t = time.monotonic()
    assert len(c.embed(model=EMBED, input="after").embeddings[0]) == 576
    waited = time.monotonic() - t
    assert waited < 3 * one + 2, (waited, one)  # (the rest of the batch: ~10 x one)


def test_a_chat_longer_than_the_context_loses_its_oldest_messages(system: System) -> None:
    """Ollama's truncate (its default): a long conversation still gets an answer; truncate false: a 400."""
    talk = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Message {i}: " + "hello world " * 60}
            for i in range(40)]  # ~5000 tokens, the context is 2048
    messages = [{"role": "system", "content": "Be brief."}, *talk, {"role": "user", "content": "Say hi."}]
    r = ollama.Client(system.ollama_url).chat(model=MODEL, messages=messages, options=OPTS)
    assert r.done and r.prompt_eval_count is not None and r.prompt_eval_count < 2048
    status, doc, _ = http("POST", system.ollama_url + "/api/chat",
                          {"model": MODEL, "messages": messages, "truncate": False, "stream": False})
    assert status == 400 and "context" in doc["error"]


def test_one_message_or_prompt_longer_than_the_context_is_cut_at_its_front(system: System) -> None:
    """A long document in one message (RAG, "stuff" chains): Ollama keeps the end of the input and answers."""
    doc = "apple " * 2600 + "\nSay hi."  # ~2600 tokens, the context is 2048
    c = ollama.Client(system.ollama_url)
    r = c.chat(model=MODEL, messages=[{"role": "user", "content": doc}], options=OPTS)
    assert r.done and r.prompt_eval_count is not None and r.prompt_eval_count < 2048
    g = c.generate(model=MODEL, prompt=doc, raw=True, options=OPTS)
    assert g.done and g.prompt_eval_count is not None and g.prompt_eval_count < 2048
    huge = "The quick brown fox. " * 5000 + "\nSay hi."  # ~22,000 tokens: ten times the context (it was a 400)
    r = c.chat(model=MODEL, messages=[{"role": "user", "content": huge}], options=OPTS)
    assert r.done and r.prompt_eval_count is not None and 1000 < r.prompt_eval_count < 2048
    pirate = "You are a pirate. " * 800  # a system prompt longer than the context (it was a 400)
    r = c.chat(model=MODEL, messages=[{"role": "system", "content": pirate}, {"role": "user", "content": "hi"}],
               options=OPTS)
    assert r.done and r.prompt_eval_count is not None and r.prompt_eval_count < 2048
    g = c.generate(model=MODEL, system=pirate, prompt="hi", options=OPTS)
    assert g.done and g.prompt_eval_count is not None and g.prompt_eval_count < 2048


def test_think_on_a_model_that_does_not_reason_is_ollamas_400(system: System) -> None:
    c = ollama.Client(system.ollama_url)
    with pytest.raises(ollama.ResponseError) as err:
        c.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], think=True)
    assert err.value.status_code == 400 and "does not support thinking" in err.value.error
    r = c.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], think=False, options=OPTS)
    assert r.done and not r.message.thinking


def test_tools_and_suffix_on_a_model_without_them_are_ollamas_400(system: System) -> None:
    """A model whose template takes no tools (or no suffix) would answer in plain text; Ollama refuses, and
    agents (LangChain's bind_tools...) and editors catch that 400 to fall back."""
    c = ollama.Client(system.ollama_url)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    with pytest.raises(ollama.ResponseError) as err:
        c.chat(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool])
    assert err.value.status_code == 400 and "does not support tools" in err.value.error
    # the same under Ollama's /v1 (OpenAI clients pointed at Ollama: the tools were silently ignored)
    with pytest.raises(openai.BadRequestError) as oerr:
        openai.OpenAI(base_url=system.ollama_url + "/v1", api_key="ollama", max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool])  # type: ignore[list-item]
    assert "does not support tools" in str(oerr.value)
    with pytest.raises(ollama.ResponseError) as err:
        c.generate(model=MODEL, prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))")
    assert err.value.status_code == 400 and "does not support insert" in err.value.error


def test_a_speech_model_on_the_chat_and_embed_routes_is_a_400_that_loads_nothing(system: System) -> None:
    """(It loaded the whisper worker, evicting a model, to say so.)"""
    import time

    before = system.worker("whisper-tiny.en")["state"]
    c = ollama.Client(system.ollama_url)
    for call in (lambda: c.chat(model="whisper-tiny.en", messages=[{"role": "user", "content": "Hi"}]),
                 lambda: c.generate(model="whisper-tiny.en", prompt="Hi"),
                 lambda: c.embed(model="whisper-tiny.en", input="Hi"),
                 lambda: c.generate(model="whisper-1"),  # a load alone (it loaded it: 200, done_reason "load")
                 lambda: c.chat(model="whisper-1", messages=[])):
        t0 = time.monotonic()
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 400 and "speech-to-text" in err.value.error
        assert time.monotonic() - t0 < 0.5
    assert system.worker("whisper-tiny.en")["state"] == before


def test_legacy_embeddings(system: System) -> None:
    c = ollama.Client(system.ollama_url)
    r = c.embeddings(model=EMBED, prompt="Here is an article about llamas")
    assert len(r.embedding) == 576
    # the model's own vector, as Ollama's legacy endpoint gives it: the same direction as /api/embed's, which
    # is normalized
    unit = c.embed(model=EMBED, input="Here is an article about llamas").embeddings[0]
    assert abs(norm(r.embedding) - 1) > 1e-3
    assert all(abs(a / norm(r.embedding) - b) < 1e-4 for a, b in zip(r.embedding, unit, strict=True))


def test_embed_on_a_chat_model_is_a_clear_400(system: System) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(system.ollama_url).embed(model=MODEL, input="x")
    assert err.value.status_code == 400 and "does not support embeddings" in err.value.error


def test_chat_on_an_embedding_model_is_a_clear_400(system: System) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(system.ollama_url).chat(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 400 and "embedding model" in err.value.error


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/api/pull", {"model": "llama3"}),
    ("POST", "/api/push", {"model": "me/llama3"}),
    ("POST", "/api/create", {"model": "mario", "from": MODEL}),
    ("POST", "/api/copy", {"source": MODEL, "destination": "copy"}),
    ("DELETE", "/api/delete", {"model": MODEL}),
])
def test_model_management_answers_an_ollama_error(system: System, method: str, path: str, body: dict) -> None:
    status, doc, headers = http(method, system.ollama_url + path, body)
    assert status == 501 and headers["Content-Type"].startswith("application/json")
    assert isinstance(doc["error"], str) and "not supported" in doc["error"] and "models_config.json" in doc["error"]


def test_client_pull_raises_response_error(system: System) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(system.ollama_url).pull("llama3", stream=False)
    assert "not supported" in err.value.error


def test_unknown_route_is_json_404(system: System) -> None:
    status, doc, _ = http("GET", system.ollama_url + "/api/nope")
    assert status == 404 and isinstance(doc["error"], str)


def test_openai_routes_on_the_ollama_port(system: System) -> None:
    client = openai.OpenAI(base_url=system.ollama_url + "/v1", api_key="ollama")
    assert {m.id for m in client.models.list()} == {MODEL, EMBED, "whisper-tiny.en"}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert r.choices[0].message.content is not None and r.model == MODEL
    e = client.embeddings.create(model=EMBED, input="hello")
    assert len(e.data[0].embedding) == 576
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.code == "model_not_found"  # OpenAI's error shape under /v1, Ollama's elsewhere
    status, doc, _ = http("GET", system.ollama_url + "/v1/nope")
    assert status == 404 and isinstance(doc["error"], dict) and doc["error"]["message"]


def test_a_continued_chat_answers_only_what_is_new(system: System) -> None:
    """A chat that ends with an assistant message is continued; the answer is the new text only, as Ollama's
    (llama-server repeats the message first: a client appending the answer doubled it)."""
    c = ollama.Client(system.ollama_url)
    messages = [{"role": "user", "content": "Tell me about zebras"},
                {"role": "assistant", "content": "QQXYZ zebras are"}]
    r = c.chat(model=MODEL, messages=messages, options=OPTS)
    assert r.message.content and "QQXYZ" not in r.message.content, r.message.content
    streamed = "".join(part.message.content or "" for part in c.chat(model=MODEL, messages=messages, options=OPTS,
                                                                      stream=True))
    assert streamed == r.message.content


def test_repeat_last_n_minus_one_is_the_context(system: System) -> None:
    """Ollama documents -1 as "num_ctx"; llama-server takes no -1 (it was its 400)."""
    r = ollama.Client(system.ollama_url).generate(model=MODEL, prompt="Hi", options={**OPTS, "repeat_last_n": -1})
    assert r.done
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(system.ollama_url).generate(model=MODEL, prompt="Hi", options={"repeat_last_n": -2})
    assert err.value.status_code == 400 and "repeat_last_n" in err.value.error


def test_a_client_librarys_batch_of_prompts_waits_its_turn(system: System) -> None:
    """LangChain's abatch of 20 prompts: 10 of them were refused "queue is full" (503), where Ollama queues up to
    512 requests a model."""
    import asyncio

    async def main() -> list[object]:
        c = ollama.AsyncClient(system.ollama_url, timeout=120)
        return await asyncio.gather(*(c.generate(model=MODEL, prompt=f"Story {i}", options={"num_predict": 8})
                                      for i in range(24)), return_exceptions=True)

    results = asyncio.run(main())
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, failed[:3]


def test_the_ollama_ports_v1_cuts_an_input_longer_than_the_context_as_ollama_does(system: System) -> None:
    """Ollama's /v1 runs through its chat and generate handlers, which truncate: an editor or agent pointed at
    localhost:11434/v1 with a big context got a 400 here. The LM Studio port keeps OpenAI's 400."""
    import openai

    doc = "apple " * 2600 + "\nSay hi."  # ~2600 tokens, the context is 2048
    v1 = openai.OpenAI(base_url=system.ollama_url + "/v1", api_key="ollama", max_retries=0)
    r = v1.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": doc}], max_tokens=2)
    assert r.usage is not None and r.usage.prompt_tokens < 2048
    stream = v1.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": doc}], max_tokens=2,
                                        stream=True)
    assert any(c.choices and c.choices[0].finish_reason for c in stream)
    c = v1.completions.create(model=MODEL, prompt=doc, max_tokens=2)
    assert c.usage is not None and c.usage.prompt_tokens < 2048
    lm = openai.OpenAI(base_url=system.openai_url, api_key="lm-studio", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        lm.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": doc}], max_tokens=2)
    assert err.value.code == "context_length_exceeded"


def test_the_shipped_ollama_port_lets_this_machines_pages_in_as_ollama_does(system: System) -> None:
    """Ollama's default origins (localhost and 127.0.0.1 on any port, app://, tauri://, vscode-webview://...): a
    web UI on localhost:3000 calling the Ollama port got a 403 preflight. The LM Studio port keeps CORS off."""
    import httpx

    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "tauri://localhost", "vscode-webview://x"):
        r = httpx.options(system.ollama_url + "/api/chat", headers={"Origin": origin, **pre}, timeout=10)
        assert r.status_code == 204 and r.headers["access-control-allow-origin"] == origin, (origin, r.status_code)
    r = httpx.post(system.ollama_url + "/api/generate", headers={"Origin": "http://localhost:3000"}, timeout=60,
                   json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 1}})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = httpx.options(system.ollama_url + "/api/chat", headers={"Origin": "http://evil.example", **pre}, timeout=10)
    assert r.status_code == 403
    r = httpx.options(system.openai_url + "/chat/completions", headers={"Origin": "http://localhost:3000", **pre},
                      timeout=10)
    assert r.status_code == 403
