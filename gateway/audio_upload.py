"""Reading an OpenAI audio request: a multipart/form-data upload, size-limited while it is read.

The whole upload is never buffered beyond ``max_bytes``: the file part is read in chunks and the request is
refused with 413 as soon as the running total passes the limit (a Content-Length above it is refused before
reading anything). Form fields other than the file are small and capped too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web

from gateway.audio_format import RESPONSE_FORMATS
from gateway.audio_languages import language_code
from gateway.errors import ApiError

CHUNK = 64 * 1024
FIELD_MAX = 64 * 1024  # any non-file field (a prompt is at most a few hundred tokens)
FIELDS_MAX = 256 * 1024  # all non-file fields together (3,000 fields of 60 KB each took a gateway to 364 MB)
PARTS_MAX = 64  # parts of one form (the API has fewer than a dozen fields)
FORM_OVERHEAD = 64 * 1024  # room for boundaries and the small fields when checking Content-Length


@dataclass
class Upload:
    """The form as sent: the file's bytes and name, and every other field (repeated fields keep all)."""

    file: bytes | None = None
    filename: str = ""
    fields: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the upload is larger than the limit of {limit} bytes (limits.max_upload_bytes)",
                    code="upload_too_large", param="file")


async def _read_capped(part: BodyPartReader, cap: int, on_over: ApiError) -> bytes:
    buf = bytearray()
    while True:
        chunk = await part.read_chunk(CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > cap:
            raise on_over


async def read_upload(request: web.Request, max_bytes: int) -> Upload:
    """The multipart form of ``request``; 400 if it is not one, 413 once the file passes ``max_bytes``."""
    ctype = request.headers.get("Content-Type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(400, "expected a multipart/form-data body with a `file` field (got "
                       f"{ctype.split(';')[0] or 'no Content-Type'})", code="invalid_request")
    length = request.content_length
    if length is not None and length > max_bytes + FORM_OVERHEAD:
        raise _too_large(max_bytes)
    up = Upload()
    fields_size = parts = 0
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            parts += 1
            if parts > PARTS_MAX:
                raise ApiError(400, f"the form has more than {PARTS_MAX} parts", code="invalid_request")
            if isinstance(part, MultipartReader):  # nested multipart/mixed: not part of this API
                raise ApiError(400, "nested multipart bodies are not supported", code="invalid_request")
            if part.name == "file":
                up.file = await _read_capped(part, max_bytes, _too_large(max_bytes))
                up.filename = part.filename or ""
            elif part.filename:  # a file under another name (`audio`, `upload`): said so (not "too long a field")
                raise ApiError(400, f"the audio goes in the `file` field (a file came in `{part.name}`)",
                               code="invalid_request", param="file")
            elif part.name:
                over = ApiError(400, f"form field `{part.name}` is longer than {FIELD_MAX} bytes",
                                code="invalid_request", param=part.name)
                raw = await _read_capped(part, FIELD_MAX, over)
                fields_size += len(raw)
                if fields_size > FIELDS_MAX:
                    raise ApiError(413, f"the form's fields other than `file` are larger than {FIELDS_MAX} bytes "
                                   "together", code="upload_too_large")
                up.fields.setdefault(part.name, []).append(raw.decode("utf-8", errors="replace"))
            else:
                await part.release()
    except ApiError:
        raise
    except (ValueError, AssertionError, RuntimeError, KeyError) as exc:  # aiohttp's reader on a broken body
        raise ApiError(400, f"malformed multipart/form-data body: {exc}", code="invalid_request") from None
    return up


# --------------------------------------------------------------------------- validation (pure)
@dataclass(frozen=True)
class AudioRequest:
    model: str
    audio: bytes
    task: str
    response_format: str = "json"
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    word_timestamps: bool = False
    stream: bool = False
    granularities: tuple[str, ...] = ()


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def _bool(value: str | None, name: str) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ApiError(400, f"`{name}` must be true or false, not {value!r}", code="invalid_value", param=name)


def parse_request(up: Upload, task: str) -> AudioRequest:
    """Check the fields of an upload; every problem is a 400 naming the field."""
    if up.file is None:
        raise ApiError(400, "the `file` field is required (the audio to transcribe)", code="invalid_request",
                       param="file")
    if not up.file:
        raise ApiError(400, "the uploaded file is empty", code="invalid_audio", param="file")
    fmt = (up.get("response_format") or "json").strip().lower()
    if fmt not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {fmt!r}",
                       code="invalid_value", param="response_format")
    language = None
    raw_lang = (up.get("language") or "").strip()
    if raw_lang:
        language = language_code(raw_lang)
        if language is None:
            raise ApiError(400, f"unknown language {raw_lang!r}: use an ISO-639-1 code such as 'en'",
                           code="invalid_value", param="language")
    temperature: float | None = None
    raw_temp = (up.get("temperature") or "").strip()
    if raw_temp:
        try:
            temperature = float(raw_temp)
        except ValueError:
            temperature = -1.0
        if not 0.0 <= temperature <= 1.0:
            raise ApiError(400, f"temperature must be a number between 0 and 1, not {raw_temp!r}",
                           code="invalid_value", param="temperature")
    grans: list[str] = []
    for key in ("timestamp_granularities[]", "timestamp_granularities"):
        for value in up.fields.get(key, []):
            for g in value.replace(",", " ").split():
                if g not in ("word", "segment"):
                    raise ApiError(400, f"timestamp_granularities: {g!r} is not 'word' or 'segment'",
                                   code="invalid_value", param="timestamp_granularities")
                grans.append(g)
    if "word" in grans and fmt != "verbose_json":  # (OpenAI's rule: only verbose_json carries word timestamps;
        # "segment" with another format is accepted there, and libraries send it always)
        raise ApiError(400, f"word timestamps need response_format verbose_json (not {fmt!r})",
                       code="invalid_value", param="timestamp_granularities")
    return AudioRequest(
        model=(up.get("model") or "").strip(), audio=up.file, task=task, response_format=fmt, language=language,
        prompt=(up.get("prompt") or None), temperature=temperature, word_timestamps="word" in grans,
        stream=_bool(up.get("stream"), "stream"), granularities=tuple(dict.fromkeys(grans)),
    )


def describe(req: AudioRequest) -> dict[str, Any]:
    """For logs: the request without its audio."""
    return {"model": req.model, "task": req.task, "bytes": len(req.audio), "format": req.response_format,
            "language": req.language, "stream": req.stream, "words": req.word_timestamps}
