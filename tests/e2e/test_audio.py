"""Speech to text end to end: the real system, the real faster-whisper tiny.en worker, the real `openai` client,
on speech that espeak-ng generates."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import ROOT, System, start_system, stop_system, wait_for
from tests.speech import CODECS, need_whisper_model, speech_wav, transcode, words

# the openai client marks audio.translations deprecated (OpenAI's newer models only transcribe); it is still the API
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")]
MODEL = "whisper-tiny.en"
HELLO = {"hello", "world", "this", "test"}


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need_whisper_model()
    d = tmp_path_factory.mktemp("speech")
    return {"hello": speech_wav("hello world, this is a test", d / "hello.wav"),
            "morning": speech_wav("good morning everyone", d / "morning.wav"),
            "window": speech_wav("please open the window", d / "window.wav")}


@pytest.fixture(scope="module")
def client(system: System) -> openai.OpenAI:
    return openai.OpenAI(base_url=system.openai_url, api_key="none", max_retries=0, timeout=300)


def said(text: str) -> set[str]:
    return set(words(text))


def post_form(url: str, fields: dict[str, str], file: tuple[str, bytes] | None) -> tuple[int, dict[str, Any]]:
    """A multipart POST by hand (for what the openai client will not send, e.g. no file at all)."""
    boundary = "lrboundary7d1f"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if file is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file[0]}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + file[1] + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# --------------------------------------------------------------------------- recognition and formats
def test_transcription_json(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    with speech["hello"].open("rb") as f:
        r = client.audio.transcriptions.create(model=MODEL, file=f)
    assert HELLO <= said(r.text), r.text


def test_a_whisper_models_size_is_its_files(system: System, speech: dict[str, Path]) -> None:
    """A whisper model is a directory: its size was the directory's own, 4096 bytes (status, memory budget)."""
    assert system.worker(MODEL)["size_bytes"] > 1_000_000


def test_translation_and_the_whisper_1_alias(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    with speech["hello"].open("rb") as f:
        r = client.audio.translations.create(model="whisper-1", file=f)
    assert HELLO <= said(r.text), r.text


def test_text_srt_vtt(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    data = speech["hello"].read_bytes()
    text = client.audio.transcriptions.create(model=MODEL, file=("a.wav", data), response_format="text")
    assert isinstance(text, str) and HELLO <= said(text)
    srt = client.audio.transcriptions.create(model=MODEL, file=("a.wav", data), response_format="srt")
    lines = srt.strip().splitlines()
    assert lines[0] == "1" and lines[1].startswith("00:00:00,000 --> 00:00:0") and HELLO <= said(" ".join(lines[2:]))
    vtt = client.audio.transcriptions.create(model=MODEL, file=("a.wav", data), response_format="vtt")
    lines = vtt.strip().splitlines()
    assert lines[0] == "WEBVTT" and lines[2].startswith("00:00:00.000 --> 00:00:0") and HELLO <= said(vtt)
    tr = client.audio.translations.create(model=MODEL, file=("a.wav", data), response_format="srt")
    assert "-->" in tr and HELLO <= said(tr)


def test_verbose_json_with_word_timestamps(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    data = speech["hello"].read_bytes()
    r = client.audio.transcriptions.create(model=MODEL, file=("a.wav", data), response_format="verbose_json",
                                           timestamp_granularities=["word", "segment"])
    assert r.language == "english" and 1.0 < r.duration < 4.0 and HELLO <= said(r.text)
    assert r.segments and r.segments[0].start == 0.0 and r.segments[-1].end <= r.duration + 0.5
    assert all(s.avg_logprob < 0 and s.tokens and 0 <= s.no_speech_prob <= 1 for s in r.segments)
    assert r.words and [w.word.lower().strip(",.") for w in r.words][:2] == ["hello", "world"]
    assert all(a.start <= a.end <= b.start + 0.01 for a, b in zip(r.words, r.words[1:], strict=False))
    assert r.segments[0].id == 0  # numbered from 0, as OpenAI's
    plain = client.audio.transcriptions.create(model=MODEL, file=("a.wav", data), response_format="verbose_json")
    assert plain.segments and not plain.words
    only_words = client.audio.transcriptions.create(model=MODEL, file=("a.wav", data),
                                                    response_format="verbose_json", timestamp_granularities=["word"])
    assert only_words.words and not only_words.segments  # as OpenAI answers it


def test_stream_sends_segments_as_sse(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    with speech["hello"].open("rb") as f:
        events = list(client.audio.transcriptions.create(model=MODEL, file=f, stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert deltas and events[-1].type == "transcript.text.done"
    assert "".join(d.delta for d in deltas) == events[-1].text and HELLO <= said(events[-1].text)


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_compressed_formats(client: openai.OpenAI, speech: dict[str, Path], suffix: str) -> None:
    path = transcode(speech["morning"], suffix)
    r = client.audio.transcriptions.create(model=MODEL, file=(path.name, path.read_bytes()), language="en")
    assert {"good", "morning"} <= said(r.text), (suffix, r.text)


def test_concurrent_pair_each_gets_its_own_text(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def run(key: str) -> None:
        try:
            results[key] = client.audio.transcriptions.create(
                model=MODEL, file=(f"{key}.wav", speech[key].read_bytes()), response_format="text")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("morning", "window")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert {"good", "morning", "everyone"} <= said(results["morning"]) and "window" not in said(results["morning"])
    assert {"open", "window"} <= said(results["window"]) and "morning" not in said(results["window"])


def test_ollama_port_serves_audio_too(system: System, speech: dict[str, Path]) -> None:
    c = openai.OpenAI(base_url=system.ollama_url + "/v1", api_key="none", max_retries=0, timeout=300)
    r = c.audio.transcriptions.create(model=MODEL, file=("a.wav", speech["hello"].read_bytes()))
    assert HELLO <= said(r.text)
    with pytest.raises(openai.BadRequestError) as err:  # errors in OpenAI's shape on the Ollama port
        c.audio.transcriptions.create(model=MODEL, file=("a.wav", b""))
    assert err.value.code == "invalid_audio"


# --------------------------------------------------------------------------- bad input
def test_not_audio_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.transcriptions.create(model=MODEL, file=("notes.wav", b"this is not audio at all\n" * 100))
    assert err.value.status_code == 400 and err.value.code == "invalid_audio"
    assert "not audio" in err.value.message and "Errno" not in err.value.message  # (FFmpeg's words only)


def test_empty_file_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.translations.create(model=MODEL, file=("empty.wav", b""))
    assert err.value.code == "invalid_audio" and "empty" in err.value.message


def test_missing_file_and_bad_fields_are_400(system: System, speech: dict[str, Path]) -> None:
    url = system.openai_url + "/audio/transcriptions"
    status, body = post_form(url, {"model": MODEL}, None)
    assert status == 400 and body["error"]["param"] == "file", body
    status, body = post_form(url, {"model": MODEL, "response_format": "mp4"}, ("a.wav", b"RIFF"))
    assert status == 400 and body["error"]["param"] == "response_format", body
    status, body = post_form(url, {"model": MODEL, "language": "klingon"}, ("a.wav", b"RIFF"))
    assert status == 400 and body["error"]["param"] == "language", body
    # a real language the English-only model does not speak (faster-whisper would transcribe English silently)
    status, body = post_form(url, {"model": MODEL, "language": "fr"}, ("a.wav", speech["hello"].read_bytes()))
    assert status == 400 and body["error"]["param"] == "language" and "English only" in body["error"]["message"]
    # a file in another field: said so (it was "form field `audio` is longer than 65536 bytes")
    status, body = httpx_form(url, {"model": MODEL}, "audio", ("a.wav", speech["hello"].read_bytes() * 2))
    assert status == 400 and "the audio goes in the `file` field" in body["error"]["message"], body
    # word timestamps come with verbose_json only (OpenAI's rule; they were left out silently)
    status, body = post_form(url, {"model": MODEL, "response_format": "json", "timestamp_granularities[]": "word"},
                             ("a.wav", speech["hello"].read_bytes()))
    assert status == 400 and body["error"]["param"] == "timestamp_granularities", body
    # under 0.1 s: OpenAI's "too short" (it was a 200 with no text)
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x01" * 100)
    status, body = post_form(url, {"model": MODEL}, ("short.wav", buf.getvalue()))
    assert status == 400 and "too short" in body["error"]["message"], body
    req = urllib.request.Request(url, data=b'{"model": "whisper-1"}', method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "multipart/form-data" in json.loads(err.value.read())["error"]["message"]


def httpx_form(url: str, fields: dict[str, str], name: str, file: tuple[str, bytes]) -> tuple[int, dict]:
    import httpx

    r = httpx.post(url, data=fields, files={name: file}, timeout=60)
    return r.status_code, r.json()


def test_unknown_model_is_404(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.audio.transcriptions.create(model="no-such-whisper", file=("a.wav", speech["hello"].read_bytes()))
    assert err.value.code == "model_not_found"


def test_llama_model_is_400(client: openai.OpenAI, system: System, speech: dict[str, Path]) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.transcriptions.create(model="smollm2", file=("a.wav", speech["hello"].read_bytes()))
    assert err.value.code == "wrong_model_type"
    assert system.worker("smollm2")["state"] == "stopped"  # refused before starting anything


def test_whisper_worker_is_a_supervised_worker(client: openai.OpenAI, system: System, speech: dict[str, Path]) -> None:
    client.audio.transcriptions.create(model=MODEL, file=("a.wav", speech["window"].read_bytes()))
    w = system.worker(MODEL)
    assert w["kind"] == "whisper" and w["state"] == "ready" and w["pid"]


def test_killed_whisper_worker_is_restarted(client: openai.OpenAI, system: System, speech: dict[str, Path]) -> None:
    client.audio.transcriptions.create(model=MODEL, file=("a.wav", speech["window"].read_bytes()))
    before = system.worker(MODEL)
    assert before["state"] == "ready"
    os.kill(before["pid"], signal.SIGKILL)
    wait_for(lambda: system.worker(MODEL)["pid"] != before["pid"], 30, "the supervisor to notice the crash")
    r = client.audio.transcriptions.create(model=MODEL, file=("a.wav", speech["morning"].read_bytes()))
    assert {"good", "morning"} <= said(r.text)
    after = system.worker(MODEL)
    assert after["state"] == "ready" and after["pid"] != before["pid"] and after["restarts"] >= 1


# --------------------------------------------------------------------------- upload limit, eviction
@pytest.fixture(scope="module")
def small_limit() -> Iterator[System]:
    """A 40 kB upload limit, 3 s to send it, and room for one loaded model only."""
    cfg = Path(tempfile.mkdtemp(prefix="lr-audio-cfg-"))
    shutil.copy(ROOT / "config" / "models_config.json", cfg / "models_config.json")
    app = json.loads((ROOT / "config" / "app_config.json").read_text())
    app.setdefault("limits", {})["max_upload_bytes"] = 40_000
    app["limits"]["max_loaded_models"] = 1
    app["limits"]["read_timeout_s"] = 3
    (cfg / "app_config.json").write_text(json.dumps(app))
    sysm = start_system(cfg)
    try:
        yield sysm
    finally:
        stop_system(sysm)
        shutil.rmtree(sysm.run_dir, ignore_errors=True)
        shutil.rmtree(cfg, ignore_errors=True)


def test_upload_over_the_limit_is_413(small_limit: System, speech: dict[str, Path]) -> None:
    c = openai.OpenAI(base_url=small_limit.openai_url, api_key="none", max_retries=0, timeout=120)
    big = speech["hello"].read_bytes()  # ~85 kB
    assert len(big) > 40_000
    with pytest.raises(openai.APIStatusError) as err:
        c.audio.transcriptions.create(model=MODEL, file=("a.wav", big))
    assert err.value.status_code == 413 and "40000" in err.value.message
    # chunked upload (no Content-Length to check first): refused while reading
    def chunks() -> Iterator[bytes]:
        boundary = "lrb"
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{MODEL}\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n').encode()
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]
        yield f"\r\n--{boundary}--\r\n".encode()

    import httpx

    r = httpx.post(small_limit.openai_url + "/audio/transcriptions", content=chunks(), timeout=60,
                   headers={"Content-Type": "multipart/form-data; boundary=lrb"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    # under the limit: fine (and the worker was never needed for the refusals)
    small = transcode(speech["morning"], "mp3").read_bytes()
    assert len(small) < 40_000
    assert {"good", "morning"} <= said(c.audio.transcriptions.create(model=MODEL, file=("a.mp3", small)).text)


def test_whisper_worker_is_evicted_like_llama_workers(small_limit: System, speech: dict[str, Path]) -> None:
    """One model fits: a chat request unloads the idle whisper worker, the next transcription brings it back."""
    c = openai.OpenAI(base_url=small_limit.openai_url, api_key="none", max_retries=0, timeout=300)
    small = transcode(speech["window"], "mp3").read_bytes()
    assert {"open", "window"} <= said(c.audio.transcriptions.create(model=MODEL, file=("a.mp3", small)).text)
    assert small_limit.worker(MODEL)["state"] == "ready"
    chat = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.choices
    wait_for(lambda: small_limit.worker(MODEL)["state"] == "stopped", 30, "the whisper worker to be evicted")
    assert {"open", "window"} <= said(c.audio.transcriptions.create(model=MODEL, file=("a.mp3", small)).text)
    wait_for(lambda: small_limit.worker("smollm2")["state"] == "stopped", 30, "smollm2 to be evicted in turn")


def test_stalled_upload_is_408(small_limit: System) -> None:
    with socket.create_connection(("127.0.0.1", small_limit.openai_port), timeout=30) as sock:
        sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 30000\r\n"
                     b"Content-Type: multipart/form-data; boundary=lrb\r\n\r\n"
                     b'--lrb\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF')
        t0 = time.monotonic()
        head = sock.recv(4096)  # the client sends nothing more
    assert head.startswith(b"HTTP/1.1 408"), head[:200]
    assert 2.5 < time.monotonic() - t0 < 20 and b"request_timeout" in head


def test_a_form_of_many_fields_is_refused_before_it_fills_the_gateway(system: System) -> None:
    """Only the file and each one field were bounded: 3,000 fields of 60 KB took a gateway to 364 MB, and a
    gzip body of them as much as it unpacked to."""
    url = system.openai_url + "/audio/transcriptions"
    many = {f"junk{i}": "x" * 60_000 for i in range(10)}
    status, body = post_form(url, {"model": MODEL, **many}, ("a.wav", b"RIFF"))
    assert status == 413 and "together" in body["error"]["message"], body
    parts = {f"p{i}": "y" for i in range(100)}
    status, body = post_form(url, {"model": MODEL, **parts}, ("a.wav", b"RIFF"))
    assert status == 400 and "parts" in body["error"]["message"], body
