"""The real system (real llama-server, real SmolLM2) driven by the real `ollama` and `openai` clients."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import ollama
import openai
import pytest

from tests.conftest import System

pytestmark = pytest.mark.e2e
MODEL = "smollm2"
MSG = [{"role": "user", "content": "Say hello in three words."}]
OPTS = {"num_predict": 12, "temperature": 0, "seed": 1}


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


# --------------------------------------------------------------------------- Ollama
def test_ollama_root_and_version(system: System) -> None:
    status, body, _ = http("GET", system.ollama_url + "/")
    assert status == 200 and body == b"Ollama is running"
    status, body, _ = http("HEAD", system.ollama_url + "/")
    assert status == 200
    assert ollama.Client(system.ollama_url).ps is not None
    status, body, _ = http("GET", system.ollama_url + "/api/version")
    assert status == 200 and json.loads(body)["version"]


def test_ollama_list_shows_config_names(system: System) -> None:
    names = [m.model for m in ollama.Client(system.ollama_url).list().models]
    assert names == [MODEL + ":latest", "smollm2-embed:latest"]  # tagged, as Ollama lists them


def test_ollama_chat_stream_yields_tokens(system: System) -> None:
    parts = list(ollama.Client(system.ollama_url).chat(model=MODEL, messages=MSG, stream=True, options=OPTS))
    assert len(parts) >= 3
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    text = "".join(p.message.content for p in parts)
    assert text.strip()
    last = parts[-1]
    assert last.done_reason in ("stop", "length")
    assert last.eval_count and last.eval_count > 0 and last.prompt_eval_count and last.prompt_eval_count > 0
    assert last.total_duration and last.total_duration > last.eval_duration > 0


def test_ollama_chat_non_stream(system: System) -> None:
    r = ollama.Client(system.ollama_url).chat(model=MODEL, messages=MSG, stream=False, options=OPTS)
    assert r.done and r.message.role == "assistant" and r.message.content.strip()
    assert r.done_reason in ("stop", "length") and r.eval_count


def test_ollama_generate_stream_and_not(system: System) -> None:
    client = ollama.Client(system.ollama_url)
    parts = list(client.generate(model=MODEL, prompt="The sky is", stream=True, options=OPTS))
    assert parts[-1].done and "".join(p.response for p in parts).strip()
    r = client.generate(model=f"{MODEL}:latest", prompt="The sky is", options=OPTS)
    assert r.done and r.response.strip() and r.done_reason in ("stop", "length")


def test_ollama_unknown_model_is_404(system: System) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(system.ollama_url).chat(model="no-such-model", messages=MSG)
    assert err.value.status_code == 404 and "no-such-model" in err.value.error


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_ollama_bad_json_is_400(system: System, path: str) -> None:
    status, body, ctype = http("POST", system.ollama_url + path, b"{not json")
    assert status == 400 and "application/json" in ctype
    assert isinstance(json.loads(body)["error"], str)


# --------------------------------------------------------------------------- OpenAI / LM Studio
def client(system: System) -> openai.OpenAI:
    return openai.OpenAI(base_url=system.openai_url, api_key="x", max_retries=0)


def test_openai_models_lists_config_names(system: System) -> None:
    assert [m.id for m in client(system).models.list()] == [MODEL, "smollm2-embed", "whisper-tiny.en"]


def test_openai_chat_stream_yields_deltas(system: System) -> None:
    stream = client(system).chat.completions.create(model=MODEL, messages=MSG, stream=True, max_tokens=12,
                                                    temperature=0, seed=1)
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 3 and "".join(deltas).strip()
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_openai_chat_non_stream_has_usage(system: System) -> None:
    r = client(system).chat.completions.create(model=MODEL, messages=MSG, max_tokens=12, temperature=0)
    assert r.choices[0].message.content.strip()
    assert r.usage and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    assert r.model == MODEL


def test_openai_completions_stream_and_not(system: System) -> None:
    c = client(system)
    r = c.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage and r.usage.completion_tokens > 0
    parts = list(c.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, stream=True,
                                        temperature=0))
    assert "".join(p.choices[0].text for p in parts if p.choices).strip()


def test_openai_stream_ends_with_done(system: System) -> None:
    body = json.dumps({"model": MODEL, "messages": MSG, "stream": True, "max_tokens": 4}).encode()
    status, raw, ctype = http("POST", system.openai_url + "/chat/completions", body)
    assert status == 200 and ctype.startswith("text/event-stream")
    assert raw.rstrip().endswith(b"data: [DONE]")


def test_openai_unknown_model_is_404(system: System) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(system).chat.completions.create(model="no-such-model", messages=MSG)
    body = err.value.body
    assert isinstance(body, dict) and "no-such-model" in body["message"]


def test_openai_bad_json_is_400(system: System) -> None:
    status, body, _ = http("POST", system.openai_url + "/chat/completions", b"[1,")
    assert status == 400
    err = json.loads(body)["error"]
    assert err["message"] and err["type"] == "invalid_request_error"


def test_alias_is_served_under_its_own_name(system: System) -> None:
    r = client(system).chat.completions.create(model="smollm2-135m-instruct", messages=MSG, max_tokens=4)
    assert r.model == "smollm2-135m-instruct"
