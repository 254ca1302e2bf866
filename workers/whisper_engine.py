"""faster-whisper inside a worker: load a model from a local directory, decode one upload, yield its segments.

Everything here runs in a worker thread (the event loop stays free for cancel, metrics and new jobs) and talks
back only through plain callables, so it is testable without sockets. faster-whisper is imported lazily: the
supervisor and the gateways may import this module's light parts (``whisper_params``) without paying for it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bus.protocol import TranscribeJob, WhisperParams

# faster-whisper's default temperature fallback (OpenAI's API: temperature 0 means "fall back as needed").
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MODEL_FILE = "model.bin"

Line = dict[str, Any]


class AudioError(ValueError):
    """The upload is not audio that can be transcribed (not decodable, empty, no samples, too long): the client's
    fault, a 400 with this ``code`` about this ``param``."""

    def __init__(self, message: str, code: str = "invalid_audio", param: str = "file") -> None:
        super().__init__(message)
        self.code, self.param = code, param


class BadLanguage(AudioError):
    """A language the model does not speak was asked for (an English-only model: faster-whisper would
    silently transcribe in English instead)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "unsupported_language", "language")


class Cancelled(Exception):
    """The job was cancelled between two segments."""


class ModelDirError(FileNotFoundError):
    """The configured model path is not a local faster-whisper model directory."""


def whisper_params(cfg: Any) -> WhisperParams:
    """The launch settings of a whisper model from its config (a ``config.schema.WhisperConfig``)."""
    return WhisperParams(device=cfg.device, compute_type=cfg.compute_type, cpu_threads=cfg.cpu_threads,
                         beam_size=cfg.beam_size, language=cfg.language)


def check_model_dir(path: str | Path) -> Path:
    """``path`` as a local model directory. Never let faster-whisper see anything else: it would take a
    missing path for a hub name and try to download it."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelDirError(f"whisper model directory not found: {p}")
    if not (p / MODEL_FILE).is_file():
        raise ModelDirError(f"{p} is not a faster-whisper model directory (no {MODEL_FILE})")
    return p


def load_model(path: str | Path, params: WhisperParams, num_workers: int = 1) -> Any:
    """A ``faster_whisper.WhisperModel`` from a local directory (blocking: call it in a thread)."""
    from faster_whisper import WhisperModel

    local = check_model_dir(path)
    return WhisperModel(str(local), device=params.device, compute_type=params.compute_type,
                        cpu_threads=params.cpu_threads, num_workers=max(1, num_workers), local_files_only=True)


MIN_SECONDS = 0.1


GROUP_SAMPLES = 500_000  # source samples resampled at a time (faster-whisper's own decode_audio groups so too)


def decode(audio: bytes, sampling_rate: int = 16000, max_seconds: float = 0.0) -> Any:
    """The upload as a mono float32 array at ``sampling_rate``; AudioError when it is not usable audio, or longer
    than ``max_seconds`` (0: no limit). Decoded as faster-whisper's decode_audio does (PyAV, s16 mono), but a piece
    at a time with its length counted: memory follows the audio's length, not the upload's (a 656 KB file of an
    hour's silence took a worker to 3.2 GB; 25 MB of it would have asked for ~120 GB)."""
    if not audio:
        raise AudioError("the audio file is empty")
    try:
        samples = _decode_bounded(audio, sampling_rate, int(max_seconds * sampling_rate) if max_seconds else 0)
    except AudioError:
        raise
    except Exception as exc:  # av.error.FFmpegError (InvalidDataError...), or anything else av stumbles on
        why = getattr(exc, "strerror", None) or str(exc)  # (FFmpeg's words, without its errno)
        raise AudioError("the file is not audio in a format that can be decoded (wav, mp3, ogg, flac, m4a, webm, "
                         f"...): {why}") from None
    size = getattr(samples, "size", 0)
    if size == 0:
        raise AudioError("the file holds no audio samples")
    if size < MIN_SECONDS * sampling_rate:  # (as OpenAI's: "Audio file is too short")
        raise AudioError(f"the audio is too short: {size / sampling_rate:.3f} s (at least {MIN_SECONDS} s)")
    return samples


def _decode_bounded(audio: bytes, sampling_rate: int, max_samples: int) -> Any:
    import av
    import numpy as np

    resampler = av.audio.resampler.AudioResampler(format="s16", layout="mono", rate=sampling_rate)
    fifo = av.audio.fifo.AudioFifo()
    pieces: list[Any] = []
    total = 0

    def take(group: Any) -> None:
        nonlocal total
        for frame in resampler.resample(group):
            piece = frame.to_ndarray().reshape(-1)
            total += piece.size
            if max_samples and total > max_samples:
                raise AudioError(f"the audio is longer than the limit of {max_samples / sampling_rate:.0f} s "
                                 "(the model's whisper.max_audio_s)", code="audio_too_long")
            pieces.append(piece)

    with av.open(io.BytesIO(audio), mode="r", metadata_errors="ignore") as container:
        frames = iter(container.decode(audio=0))
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.InvalidDataError:  # (a damaged frame is skipped, as faster-whisper does)
                continue
            frame.pts = None
            fifo.write(frame)
            if fifo.samples >= GROUP_SAMPLES:
                take(fifo.read())
        if fifo.samples:
            take(fifo.read())
        take(None)  # (the resampler's last samples)
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(pieces).astype(np.float32) / 32768.0


def temperatures(temperature: float | None) -> tuple[float, ...]:
    if not temperature:
        return FALLBACK_TEMPERATURES
    return (float(temperature),)


def transcribe_options(job: TranscribeJob, params: WhisperParams) -> dict[str, Any]:
    """Keyword arguments of ``WhisperModel.transcribe`` for a job (None options: the model's defaults)."""
    opts: dict[str, Any] = {
        "task": "translate" if job.task == "translate" else "transcribe",
        "language": job.language or params.language or None,
        "beam_size": job.beam_size or params.beam_size,
        "temperature": temperatures(job.temperature),
        "word_timestamps": job.word_timestamps,
    }
    if job.prompt:
        opts["initial_prompt"] = job.prompt
    return opts


def _f(x: Any) -> float:
    return round(float(x), 3)


def info_line(info: Any, task: str) -> Line:
    return {"type": "info", "task": task, "language": info.language,
            "language_probability": round(float(info.language_probability), 4), "duration": _f(info.duration)}


def segment_line(seg: Any) -> Line:
    line: Line = {
        "type": "segment", "id": int(seg.id), "seek": int(seg.seek), "start": _f(seg.start), "end": _f(seg.end),
        "text": seg.text, "tokens": [int(t) for t in seg.tokens],
        "temperature": float(seg.temperature) if seg.temperature is not None else 0.0,
        "avg_logprob": float(seg.avg_logprob), "compression_ratio": float(seg.compression_ratio),
        "no_speech_prob": float(seg.no_speech_prob),
    }
    if seg.words is not None:
        line["words"] = [{"word": w.word, "start": _f(w.start), "end": _f(w.end),
                          "probability": round(float(w.probability), 4)} for w in seg.words]
    return line


def transcribe(model: Any, job: TranscribeJob, params: WhisperParams, emit: Callable[[Line], None],
               cancelled: Callable[[], bool]) -> int:
    """Decode ``job.audio`` and transcribe it, calling ``emit`` with the info line, then one line per segment
    as it is decoded. Checks ``cancelled`` before decoding each segment (raises Cancelled). Returns the number
    of tokens decoded. Blocking: run it in a thread."""
    inner = getattr(model, "model", None)
    if job.language and job.language != "en" and not getattr(inner, "is_multilingual", True):
        raise BadLanguage(f"this model transcribes English only, not {job.language!r} (use a multilingual "
                          "whisper model, one without '.en')")
    sampling_rate = getattr(getattr(model, "feature_extractor", None), "sampling_rate", 16000)
    samples = decode(job.audio, sampling_rate, params.max_audio_s)
    if cancelled():
        raise Cancelled
    segments, info = model.transcribe(samples, **transcribe_options(job, params))
    emit(info_line(info, job.task))
    tokens = 0
    it: Iterator[Any] = iter(segments)
    while True:
        if cancelled():
            raise Cancelled
        try:
            seg = next(it)
        except StopIteration:
            return tokens
        tokens += len(seg.tokens)
        emit(segment_line(seg))
