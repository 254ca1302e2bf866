"""Pure formatting of a whisper worker's answer into OpenAI's audio response formats.

The worker answers JSON lines (workers/whisper_engine.py): one ``{"type": "info", ...}`` then one
``{"type": "segment", ...}`` per decoded segment. These functions turn them into ``json``, ``text``, ``srt``,
``vtt``, ``verbose_json`` bodies, and into the SSE events of a streamed transcription.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gateway.audio_languages import language_name

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
_enc = msgspec.json.Encoder()

Segment = dict[str, Any]


@dataclass
class Transcript:
    """What the worker said so far: its info line and the segments."""

    info: dict[str, Any] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)
    _rest: bytes = b""

    def feed(self, chunk: bytes) -> list[Segment]:
        """Absorb NDJSON bytes (lines may be split across chunks); returns the new segments."""
        data = self._rest + chunk
        *lines, self._rest = data.split(b"\n")
        new: list[Segment] = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                line = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                continue
            if not isinstance(line, dict):
                continue
            if line.get("type") == "info":
                self.info = line
            elif line.get("type") == "segment":
                self.segments.append(line)
                new.append(line)
        return new

    @property
    def text(self) -> str:
        return text_of(self.segments)


def text_of(segments: list[Segment]) -> str:
    return "".join(str(s.get("text", "")) for s in segments).strip()


def timestamp(seconds: float, sep: str) -> str:
    """``HH:MM:SS<sep>mmm`` (sep "," for SRT, "." for WebVTT); never negative."""
    ms = max(0, round(float(seconds) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments: list[Segment]) -> str:
    blocks = []
    for i, seg in enumerate(segments, 1):
        blocks.append(f"{i}\n{timestamp(seg['start'], ',')} --> {timestamp(seg['end'], ',')}\n"
                      f"{str(seg['text']).strip()}\n")
    return "\n".join(blocks)


def vtt(segments: list[Segment]) -> str:
    blocks = ["WEBVTT\n"]
    for seg in segments:
        blocks.append(f"{timestamp(seg['start'], '.')} --> {timestamp(seg['end'], '.')}\n{str(seg['text']).strip()}\n")
    return "\n".join(blocks)


def _usage(info: dict[str, Any]) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(float(info.get("duration", 0.0)))}


_SEGMENT_KEYS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                 "compression_ratio", "no_speech_prob")


def verbose_json(t: Transcript, task: str, words: bool, segments: bool = True) -> dict[str, Any]:
    """OpenAI's verbose_json: task, language (a name, as OpenAI reports it), duration, text, ``segments``
    (numbered from 0, as OpenAI's; unless only word timestamps were asked for) and ``words`` (word, start,
    end) when word timestamps were asked for."""
    doc: dict[str, Any] = {
        "task": task,
        "language": language_name(str(t.info.get("language", ""))),
        "duration": float(t.info.get("duration", 0.0)),
        "text": t.text,
    }
    if segments:
        doc["segments"] = [{**{k: seg[k] for k in _SEGMENT_KEYS if k in seg}, "id": i}
                           for i, seg in enumerate(t.segments)]
    if words:
        doc["words"] = [{"word": str(w["word"]).strip(), "start": w["start"], "end": w["end"]}
                        for seg in t.segments for w in seg.get("words") or []]
    doc["usage"] = _usage(t.info)
    return doc


def render(t: Transcript, response_format: str, task: str, words: bool = False, segments: bool = True
           ) -> tuple[bytes, str]:
    """The response body and its content type for ``response_format``."""
    if response_format == "text":
        return (t.text + "\n").encode(), "text/plain; charset=utf-8"
    if response_format == "srt":
        return srt(t.segments).encode(), "text/plain; charset=utf-8"
    if response_format == "vtt":
        return vtt(t.segments).encode(), "text/vtt; charset=utf-8"
    if response_format == "verbose_json":
        return _enc.encode(verbose_json(t, task, words, segments)), "application/json"
    return _enc.encode({"text": t.text, "usage": _usage(t.info)}), "application/json"


# --------------------------------------------------------------------------- streaming (SSE)
def sse(doc: dict[str, Any]) -> bytes:
    return b"data: " + _enc.encode(doc) + b"\n\n"


def delta_event(seg: Segment, first: bool) -> bytes:
    """One decoded segment as OpenAI's ``transcript.text.delta`` (deltas join to the done event's text);
    ``segment`` carries its id and timing (an extra field clients ignore)."""
    text = str(seg.get("text", ""))
    sid = seg.get("id")  # (faster-whisper counts from 1; verbose_json's segments, as OpenAI's, from 0)
    return sse({"type": "transcript.text.delta", "delta": text.lstrip() if first else text, "logprobs": None,
                "segment": {"id": sid - 1 if isinstance(sid, int) else sid, "start": seg.get("start"),
                            "end": seg.get("end")}})


def done_event(t: Transcript) -> bytes:
    return sse({"type": "transcript.text.done", "text": t.text, "logprobs": None})
