"""Speech for the audio tests, generated with espeak-ng (a Debian package the test setup installs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from config import runtime

WHISPER_DIR = runtime.default_models_root() / "faster-whisper-tiny.en"


def need_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is missing: `make test` installs it (TEST_APT_PACKAGES)")
        pytest.skip("espeak-ng is missing: apt-get install espeak-ng")


def need_whisper_model() -> Path:
    if not (WHISPER_DIR / "model.bin").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{WHISPER_DIR} is missing: run `make setup`")
        pytest.skip(f"{WHISPER_DIR} is missing: run `make setup`")
    return WHISPER_DIR


def speech_wav(text: str, path: Path) -> Path:
    """``text`` spoken (US English voice: tiny.en recognises it best) into a 22 kHz mono WAV file."""
    need_espeak()
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True, capture_output=True, timeout=60)
    return path


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, to compare recognised text loosely."""
    return "".join(c.lower() if c.isalnum() else " " for c in text).split()


# container suffix -> (encoder, sample rate)
CODECS = {"flac": ("flac", 22050), "mp3": ("libmp3lame", 22050), "ogg": ("libopus", 48000),
          "m4a": ("aac", 22050), "webm": ("libopus", 48000)}


def transcode(wav: Path, suffix: str) -> Path:
    """``wav`` re-encoded with PyAV (faster-whisper's own decoder library) into ``wav.<suffix>``."""
    import av

    codec, rate = CODECS[suffix]
    out = wav.with_suffix("." + suffix)
    with av.open(str(wav)) as src, av.open(str(out), "w") as dst:
        stream = dst.add_stream(codec, rate=rate)
        stream.layout = "mono"
        resampler = av.AudioResampler(format=stream.format, layout="mono", rate=rate,
                                      frame_size=stream.codec_context.frame_size or None)
        for frame in src.decode(audio=0):
            for f in resampler.resample(frame):
                dst.mux(stream.encode(f))
        for f in resampler.resample(None):
            dst.mux(stream.encode(f))
        dst.mux(stream.encode(None))
    return out
