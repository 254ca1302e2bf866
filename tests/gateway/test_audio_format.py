"""Pure formatting of whisper answers (json/text/srt/vtt/verbose_json, SSE) and audio request validation."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import audio_format as fmt
from gateway.audio_languages import LANGUAGES, language_code, language_name
from gateway.audio_upload import Upload, parse_request
from gateway.errors import ApiError

INFO = {"type": "info", "task": "transcribe", "language": "en", "language_probability": 1.0, "duration": 3.5}
SEG1 = {"type": "segment", "id": 1, "seek": 0, "start": 0.0, "end": 1.62, "text": " Hello world,",
        "tokens": [50363, 18435, 995, 11], "temperature": 0.0, "avg_logprob": -0.5, "compression_ratio": 0.8,
        "no_speech_prob": 0.01,
        "words": [{"word": " Hello", "start": 0.0, "end": 0.4, "probability": 0.9},
                  {"word": " world,", "start": 0.4, "end": 0.8, "probability": 0.8}]}
SEG2 = {"type": "segment", "id": 2, "seek": 0, "start": 1.62, "end": 3661.005, "text": " this is a test.",
        "tokens": [428, 318, 257, 1332, 13], "temperature": 0.2, "avg_logprob": -0.25, "compression_ratio": 0.9,
        "no_speech_prob": 0.02, "words": [{"word": " this", "start": 1.7, "end": 1.9, "probability": 0.7}]}


def ndjson(*lines: dict[str, object]) -> bytes:
    return b"".join(msgspec.json.encode(x) + b"\n" for x in lines)


def transcript() -> fmt.Transcript:
    t = fmt.Transcript()
    t.feed(ndjson(INFO, SEG1, SEG2))
    return t


# --------------------------------------------------------------------------- Transcript (NDJSON from the worker)
def test_feed_handles_lines_split_across_chunks() -> None:
    raw = ndjson(INFO, SEG1, SEG2)
    t = fmt.Transcript()
    got = []
    for i in range(0, len(raw), 7):
        got += t.feed(raw[i:i + 7])
    assert [s["id"] for s in got] == [1, 2]
    assert t.info["language"] == "en"
    assert t.text == "Hello world, this is a test."


def test_feed_skips_garbage_lines() -> None:
    t = fmt.Transcript()
    assert t.feed(b"not json\n[1,2]\n\n" + ndjson(SEG1)) == [SEG1]


def test_empty_transcript_renders_every_format() -> None:
    t = fmt.Transcript()
    for f in fmt.RESPONSE_FORMATS:
        body, _ = fmt.render(t, f, "transcribe")
        assert isinstance(body, bytes)
    assert json.loads(fmt.render(t, "json", "transcribe")[0])["text"] == ""


# --------------------------------------------------------------------------- timestamps, srt, vtt
@pytest.mark.parametrize(("seconds", "sep", "want"), [
    (0, ",", "00:00:00,000"), (1.62, ",", "00:00:01,620"), (61.5, ".", "00:01:01.500"),
    (3661.005, ".", "01:01:01.005"), (-0.2, ",", "00:00:00,000"), (59.9996, ",", "00:01:00,000"),
])
def test_timestamp(seconds: float, sep: str, want: str) -> None:
    assert fmt.timestamp(seconds, sep) == want


@given(st.floats(min_value=0, max_value=360000, allow_nan=False))
def test_timestamp_round_trips_to_the_millisecond(seconds: float) -> None:
    h, m, rest = fmt.timestamp(seconds, ",").split(":")
    s, ms = rest.split(",")
    assert abs(int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 - seconds) <= 0.0005 + 1e-9
    assert 0 <= int(m) < 60 and 0 <= int(s) < 60 and len(ms) == 3


def test_srt() -> None:
    body, ctype = fmt.render(transcript(), "srt", "transcribe")
    assert ctype.startswith("text/plain")
    assert body.decode() == ("1\n00:00:00,000 --> 00:00:01,620\nHello world,\n\n"
                             "2\n00:00:01,620 --> 01:01:01,005\nthis is a test.\n")


def test_vtt() -> None:
    body, ctype = fmt.render(transcript(), "vtt", "transcribe")
    assert ctype.startswith("text/vtt")
    assert body.decode() == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.620\nHello world,\n\n"
                             "00:00:01.620 --> 01:01:01.005\nthis is a test.\n")


def test_text_and_json() -> None:
    body, ctype = fmt.render(transcript(), "text", "transcribe")
    assert body == b"Hello world, this is a test.\n" and ctype.startswith("text/plain")
    body, ctype = fmt.render(transcript(), "json", "transcribe")
    assert ctype == "application/json"
    assert json.loads(body) == {"text": "Hello world, this is a test.", "usage": {"type": "duration", "seconds": 4}}


# --------------------------------------------------------------------------- verbose_json
def test_verbose_json_segments_without_words() -> None:
    doc = json.loads(fmt.render(transcript(), "verbose_json", "translate")[0])
    assert doc["task"] == "translate" and doc["language"] == "english" and doc["duration"] == 3.5
    assert doc["text"] == "Hello world, this is a test."
    assert "words" not in doc
    seg = doc["segments"][0]
    assert set(seg) == {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                        "compression_ratio", "no_speech_prob"}
    assert (seg["start"], seg["end"], seg["avg_logprob"], seg["tokens"]) == (0.0, 1.62, -0.5, SEG1["tokens"])
    assert [s["id"] for s in doc["segments"]] == [0, 1]  # numbered from 0, as OpenAI's (faster-whisper: from 1)


def test_verbose_json_words_flattened_and_stripped() -> None:
    doc = json.loads(fmt.render(transcript(), "verbose_json", "transcribe", words=True)[0])
    assert "segments" in doc  # words and segments asked for (or no granularity said)
    assert "segments" not in json.loads(fmt.render(transcript(), "verbose_json", "transcribe", words=True,
                                                   segments=False)[0])  # words only, as OpenAI answers
    assert doc["words"] == [{"word": "Hello", "start": 0.0, "end": 0.4}, {"word": "world,", "start": 0.4, "end": 0.8},
                            {"word": "this", "start": 1.7, "end": 1.9}]


def test_verbose_json_parses_with_the_openai_client_models() -> None:
    from openai.types.audio import TranscriptionVerbose

    doc = json.loads(fmt.render(transcript(), "verbose_json", "transcribe", words=True)[0])
    v = TranscriptionVerbose.model_validate(doc)
    assert v.segments and v.segments[1].end == 3661.005 and v.words and v.words[0].word == "Hello"


# --------------------------------------------------------------------------- SSE
def _event(raw: bytes) -> dict[str, object]:
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    return json.loads(raw[6:])


def test_stream_events_join_to_the_final_text() -> None:
    t = transcript()
    deltas = [_event(fmt.delta_event(s, first=i == 0)) for i, s in enumerate(t.segments)]
    assert all(d["type"] == "transcript.text.delta" for d in deltas)
    assert "".join(str(d["delta"]) for d in deltas) == t.text
    assert deltas[1]["segment"] == {"id": 1, "start": 1.62, "end": 3661.005}  # (as verbose_json numbers them)
    verbose = json.loads(fmt.render(t, "verbose_json", "transcribe")[0])
    assert [d["segment"]["id"] for d in deltas] == [s["id"] for s in verbose["segments"]]
    done = _event(fmt.done_event(t))
    assert done == {"type": "transcript.text.done", "text": t.text, "logprobs": None}


# --------------------------------------------------------------------------- languages
def test_language_codes() -> None:
    assert language_code("en") == "en" and language_code("English") == "en" and language_code("en-US") == "en"
    assert language_code("pt_BR") == "pt" and language_code("haw") == "haw" and language_code("klingon") is None
    assert language_name("fr") == "french" and language_name("xx") == "xx"


def test_language_table_matches_faster_whisper() -> None:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert set(LANGUAGES) == set(_LANGUAGE_CODES)


# --------------------------------------------------------------------------- request validation
def up(**fields: str | list[str]) -> Upload:
    return Upload(file=b"RIFF....", filename="a.wav",
                  fields={k: v if isinstance(v, list) else [v] for k, v in fields.items()})


def test_parse_defaults() -> None:
    req = parse_request(up(model="whisper-1"), "transcribe")
    assert (req.model, req.response_format, req.language, req.temperature, req.stream, req.word_timestamps) == (
        "whisper-1", "json", None, None, False, False)


def test_segment_timestamps_with_a_plain_format_are_accepted_as_openai_does() -> None:
    """Only word timestamps need verbose_json at OpenAI; libraries that always send ["segment"] got a 400."""
    for kind in ("json", "text", "srt"):
        req = parse_request(up(model="m", response_format=kind, **{"timestamp_granularities[]": "segment"}),
                            "transcribe")
        assert req.response_format == kind and not req.word_timestamps


def test_parse_all_fields() -> None:
    req = parse_request(up(model="m", language="English", prompt="names: Zoë", response_format="VERBOSE_JSON",
                           temperature="0.4", stream="true",
                           **{"timestamp_granularities[]": ["word", "segment"]}), "translate")
    assert req.task == "translate" and req.language == "en" and req.prompt == "names: Zoë"
    assert req.response_format == "verbose_json" and req.temperature == 0.4 and req.stream
    assert req.word_timestamps and req.granularities == ("word", "segment")


@pytest.mark.parametrize(("upload", "param", "status"), [
    (Upload(), "file", 400),
    (Upload(file=b""), "file", 400),
    (up(response_format="mp3"), "response_format", 400),
    (up(language="klingon"), "language", 400),
    (up(temperature="hot"), "temperature", 400),
    (up(temperature="1.5"), "temperature", 400),
    (up(stream="maybe"), "stream", 400),
    (up(**{"timestamp_granularities[]": "char"}), "timestamp_granularities", 400),
    (up(response_format="json", **{"timestamp_granularities[]": "word"}), "timestamp_granularities", 400),
])
def test_parse_rejects(upload: Upload, param: str, status: int) -> None:
    with pytest.raises(ApiError) as err:
        parse_request(upload, "transcribe")
    assert err.value.status == status and err.value.param == param
