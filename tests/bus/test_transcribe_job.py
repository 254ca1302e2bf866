"""Audio crosses the bus as one binary msgpack field: no base64, no temp file, barely any overhead."""

from __future__ import annotations

import os

from bus.codec import JOBS
from bus.protocol import TranscribeJob, WhisperParams, WorkerLaunch


def test_audio_is_a_raw_binary_field() -> None:
    audio = os.urandom(3 * 1024 * 1024)
    frame = JOBS.encode(TranscribeJob(request_id="r", audio=audio, task="translate", language="en",
                                      word_timestamps=True, stream=True))
    assert audio in frame  # verbatim, not base64 (which would grow it by a third)
    assert len(frame) - len(audio) < 200
    job = JOBS.decode(frame)
    assert isinstance(job, TranscribeJob) and job.audio == audio and job.task == "translate"
    assert job.word_timestamps and job.stream and job.temperature is None and job.beam_size is None


def test_launch_without_whisper_settings_gets_the_defaults() -> None:
    import msgspec

    old = b'{"name":"w","kind":"whisper","model_path":"/m","run_dir":"/r","logs_dir":"/l","supervisor_pid":1}'
    launch = msgspec.json.decode(old, type=WorkerLaunch)
    assert launch.whisper == WhisperParams(device="cpu", compute_type="int8", cpu_threads=1, beam_size=5,
                                           language=None)
