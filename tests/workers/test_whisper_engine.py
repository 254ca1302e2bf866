"""The whisper worker's thread-side logic: local model dirs only, decoding, options, cancel between segments."""

from __future__ import annotations

import io
import wave
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bus.protocol import TranscribeJob, WhisperParams
from tests.speech import need_whisper_model, speech_wav, words
from workers import whisper_engine as engine


class FakeModel:
    """Stands in for WhisperModel: ``n`` segments, decoded lazily (counts how many were decoded)."""

    feature_extractor = SimpleNamespace(sampling_rate=16000)

    def __init__(self, n: int) -> None:
        self.n = n
        self.decoded = 0
        self.opts: dict[str, Any] = {}

    def transcribe(self, samples: Any, **opts: Any) -> tuple[Any, Any]:
        self.opts = opts

        def gen() -> Any:
            for i in range(self.n):
                self.decoded += 1
                yield SimpleNamespace(id=i + 1, seek=0, start=float(i), end=i + 1.0, text=f" s{i}", tokens=[1, 2, 3],
                                      temperature=0.0, avg_logprob=-0.1, compression_ratio=1.0, no_speech_prob=0.0,
                                      words=None)

        return gen(), SimpleNamespace(language="en", language_probability=1.0, duration=float(self.n))


def silent_wav(seconds: float = 0.5, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return buf.getvalue()


def job(audio: bytes, **kw: Any) -> TranscribeJob:
    return TranscribeJob(request_id="r1", audio=audio, **kw)


# --------------------------------------------------------------------------- model directory
def test_missing_model_dir_is_refused_before_faster_whisper_sees_it(tmp_path: Path) -> None:
    # faster-whisper would take "tiny.en" (or any missing path) for a hub name and download it
    with pytest.raises(engine.ModelDirError, match="not found"):
        engine.load_model(tmp_path / "tiny.en", WhisperParams())
    (tmp_path / "empty").mkdir()
    with pytest.raises(engine.ModelDirError, match=r"no model\.bin"):
        engine.load_model(tmp_path / "empty", WhisperParams())


def test_whisper_params_from_config() -> None:
    from config.schema import WhisperConfig

    p = engine.whisper_params(WhisperConfig(compute_type="float32", cpu_threads=2, beam_size=1, language="en"))
    assert p == WhisperParams(device="cpu", compute_type="float32", cpu_threads=2, beam_size=1, language="en")
    assert engine.whisper_params(WhisperConfig()) == WhisperParams()


# --------------------------------------------------------------------------- decoding
def test_decode_rejects_empty_and_non_audio() -> None:
    with pytest.raises(engine.AudioError, match="empty"):
        engine.decode(b"")
    with pytest.raises(engine.AudioError, match="not audio"):
        engine.decode(b"this is plain text, not a sound file\n" * 50)
    with pytest.raises(engine.AudioError, match="no audio samples"):
        engine.decode(silent_wav(0))


def test_decode_resamples_wav() -> None:
    samples = engine.decode(silent_wav(0.5, rate=8000))
    assert samples.dtype.name == "float32" and abs(samples.size - 8000) < 200  # 0.5 s at 16 kHz


def tone_wav(seconds: float, rate: int) -> bytes:
    import math

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = bytearray()
        for i in range(int(seconds * rate)):
            v = int(8000 * math.sin(2 * math.pi * 440 * i / rate)).to_bytes(2, "little", signed=True)
            frames += v + v
        w.writeframes(bytes(frames))
    return buf.getvalue()


def test_decode_gives_what_faster_whispers_own_decode_gives() -> None:
    """The decode counts the audio's length as it goes (below): it must still hand the model the same samples."""
    import numpy as np
    from faster_whisper import decode_audio

    for seconds, rate in ((3.0, 44100), (0.4, 8000), (31.0, 48000)):  # (31 s at 48 kHz: more than one group)
        audio = tone_wav(seconds, rate)
        ours, theirs = engine.decode(audio), decode_audio(io.BytesIO(audio), sampling_rate=16000)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and np.array_equal(ours, theirs)


def test_audio_longer_than_the_models_limit_is_refused_as_it_is_decoded() -> None:
    """Memory followed the audio's length, not the file's: an hour of silence in 656 KB of FLAC took a worker to
    3.2 GB; 25 MB of it would have asked for ~120 GB. Longer than max_audio_s: a 400 before it is all decoded."""
    audio = tone_wav(31.0, 48000)
    with pytest.raises(engine.AudioError) as err:
        engine.decode(audio, max_seconds=10)
    assert err.value.code == "audio_too_long" and err.value.param == "file" and "10 s" in str(err.value)
    assert engine.decode(audio, max_seconds=40).size == 31 * 16000
    assert WhisperParams().max_audio_s == 3600
    with pytest.raises(engine.AudioError) as err:
        engine.transcribe(FakeModel(1), job(audio), WhisperParams(max_audio_s=5), lambda _line: None, lambda: False)
    assert err.value.code == "audio_too_long"


# --------------------------------------------------------------------------- options and streaming
def test_options_use_job_then_model_defaults() -> None:
    params = WhisperParams(beam_size=3, language="en")
    opts = engine.transcribe_options(job(b"x"), params)
    assert opts == {"task": "transcribe", "language": "en", "beam_size": 3,
                    "temperature": engine.FALLBACK_TEMPERATURES, "word_timestamps": False}
    opts = engine.transcribe_options(job(b"x", task="translate", language="fr", beam_size=1, temperature=0.3,
                                         prompt="Zoë", word_timestamps=True), params)
    assert opts == {"task": "translate", "language": "fr", "beam_size": 1, "temperature": (0.3,),
                    "word_timestamps": True, "initial_prompt": "Zoë"}
    assert engine.transcribe_options(job(b"x", temperature=0.0), params)["temperature"] == engine.FALLBACK_TEMPERATURES


def test_transcribe_emits_info_then_each_segment() -> None:
    model, lines = FakeModel(3), []
    tokens = engine.transcribe(model, job(silent_wav()), WhisperParams(), lines.append, lambda: False)
    assert tokens == 9
    assert [ln["type"] for ln in lines] == ["info", "segment", "segment", "segment"]
    assert lines[0]["duration"] == 3.0 and [ln["text"] for ln in lines[1:]] == [" s0", " s1", " s2"]


def test_cancel_stops_between_segments() -> None:
    model, lines = FakeModel(10), []

    def cancelled() -> bool:
        return len(lines) >= 3  # info + 2 segments

    with pytest.raises(engine.Cancelled):
        engine.transcribe(model, job(silent_wav()), WhisperParams(), lines.append, cancelled)
    assert model.decoded == 2  # the third segment was never decoded


def test_cancel_before_start_decodes_nothing() -> None:
    model = FakeModel(5)
    with pytest.raises(engine.Cancelled):
        engine.transcribe(model, job(silent_wav()), WhisperParams(), lambda _: None, lambda: True)
    assert model.opts == {} and model.decoded == 0


# --------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def tiny() -> Any:
    return engine.load_model(need_whisper_model(), WhisperParams())


def test_real_model_recognises_speech_with_word_timestamps(tiny: Any, tmp_path: Path) -> None:
    audio = speech_wav("hello world, this is a test", tmp_path / "hw.wav").read_bytes()
    lines: list[dict[str, Any]] = []
    engine.transcribe(tiny, job(audio, word_timestamps=True), WhisperParams(), lines.append, lambda: False)
    info, segs = lines[0], lines[1:]
    assert info["language"] == "en" and 1.0 < info["duration"] < 4.0
    text = words("".join(s["text"] for s in segs))
    assert {"hello", "world", "this", "test"} <= set(text), text
    ws = [w for s in segs for w in s["words"]]
    assert words(ws[0]["word"]) == ["hello"] and all(w["start"] <= w["end"] for w in ws)
