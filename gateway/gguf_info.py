"""What a GGUF file says about its model: architecture, size, quantization, context length, metadata.

GGUF's header is read here directly (``struct`` over a memory map: the header and the tensor descriptions, never
the weights): the ``gguf`` package would bring numpy into the gateway (~15 MB of RSS for good, once a client
lists models) and parses every element of the tokenizer's 50k-150k token lists. Array fields longer than
:data:`MAX_ARRAY` are skipped over (shown as ``[]``, as Ollama hides them unless verbose). Results are cached per
file (path, mtime, size); reading is blocking, call it in a thread. Versions 2 and 3, either byte order.
"""

from __future__ import annotations

import math
import mmap
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MAX_ARRAY", "ModelFacts", "human_number", "quantization_name", "read_facts"]

MAX_ARRAY = 64  # longer array fields (token lists, merges) are skipped, as Ollama hides them unless verbose

# GGUF value types -> struct codes (STRING = 8 and ARRAY = 9 have their own layouts)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9

# llama.cpp's llama_ftype (general.file_type) -> Ollama's quantization level
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 1024: "GUESSED",
}


def short_float32(x: float) -> float:
    """A float32 in its shortest decimal form (``1e-05``, not ``9.999999747378752e-06``)."""
    if not math.isfinite(x):
        return x
    packed = struct.pack("<f", x)
    for digits in range(1, 10):
        text = f"{x:.{digits}g}"
        if struct.pack("<f", float(text)) == packed:
            return float(text)
    return x


class _Header:
    """A cursor over a GGUF file's bytes (``order``: "<" or ">")."""

    def __init__(self, data: Any, order: str) -> None:
        self.data, self.order, self.pos = data, order, 0

    def take(self, code: str) -> Any:
        fmt = self.order + code
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def raw_string(self) -> bytes:
        n = self.take("Q")
        end = self.pos + n
        if end > len(self.data):
            raise ValueError("truncated GGUF file")
        text = bytes(self.data[self.pos : end])
        self.pos = end
        return text

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.raw_string().decode(errors="replace")
        if vtype == _ARRAY:
            itype, count = self.take("I"), self.take("Q")
            if count <= MAX_ARRAY or itype == _ARRAY:
                return [self.value(itype) for _ in range(count)]
            self.skip(itype, count)
            return []
        code = _SCALAR.get(vtype)
        if code is None:
            raise ValueError(f"unknown GGUF value type {vtype}")
        value = self.take(code)
        return short_float32(value) if vtype == _FLOAT32 else value

    def skip(self, itype: int, count: int) -> None:
        if itype == _STRING:
            fmt, data, pos = self.order + "Q", self.data, self.pos
            for _ in range(count):
                pos += 8 + struct.unpack_from(fmt, data, pos)[0]
            self.pos = pos
        elif itype in _SCALAR:
            self.pos += count * struct.calcsize(_SCALAR[itype])
        else:
            raise ValueError(f"unknown GGUF value type {itype}")
        if self.pos > len(self.data):
            raise ValueError("truncated GGUF file")


def _read_header(data: Any) -> tuple[dict[str, Any], int]:
    """(metadata, parameter count) of a GGUF file's bytes."""
    if bytes(data[:4]) != b"GGUF":
        raise ValueError("not a GGUF file (no GGUF magic)")
    version = struct.unpack_from("<I", data, 4)[0]
    order = "<"
    if version & 0xFFFF == 0:  # written big-endian
        order, version = ">", struct.unpack_from(">I", data, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    h = _Header(data, order)
    h.pos = 8
    n_tensors, n_kv = h.take("Q"), h.take("Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = h.raw_string().decode(errors="replace")
        meta[key] = h.value(h.take("I"))
    params = 0
    for _ in range(n_tensors):
        h.raw_string()  # name
        n_dims = h.take("I")
        params += math.prod(h.take("Q") for _ in range(n_dims))
        h.take("I"), h.take("Q")  # type, offset
    return meta, params


@dataclass(frozen=True)
class ModelFacts:
    """The facts of one GGUF file that the APIs report. Empty values when the file cannot be read."""

    architecture: str = ""
    name: str = ""
    organization: str = ""
    parameter_count: int = 0
    file_type: int | None = None
    quantization: str = ""  # "Q4_1", "Q4_K_M", "F16" (Ollama's quantization_level)
    context_length: int = 0
    embedding_length: int = 0
    chat_template: str = ""
    license: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)  # general.*, <arch>.*, tokenizer.* (long arrays: [])
    error: str = ""

    @property
    def parameter_size(self) -> str:
        return human_number(self.parameter_count) if self.parameter_count else ""

    @property
    def supports_tools(self) -> bool:
        return template_takes_tools(self.chat_template)

    @property
    def supports_thinking(self) -> bool:
        return template_thinks(self.chat_template)


def template_takes_tools(template: str) -> bool:
    return "tools" in template


def template_thinks(template: str) -> bool:
    """Does a chat template reason before answering (<think> blocks: Qwen3, DeepSeek-R1; gpt-oss's reasoning
    effort)?"""
    return "<think>" in template or "enable_thinking" in template or "reasoning_effort" in template


def human_number(n: int) -> str:
    """Ollama's parameter_size: ``134.52M``, ``8.0B``, ``7B``, ``12K``."""
    for unit, scale, decimals in (("B", 1e9, 1), ("M", 1e6, 2)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{decimals}f}{unit}"
    if n >= 1000:
        return f"{n / 1000:.0f}K"
    return str(n)


def quantization_name(file_type: int | None) -> str:
    """``general.file_type`` -> Ollama's quantization level (``MOSTLY_Q4_K_M`` -> ``Q4_K_M``)."""
    if file_type is None:
        return ""
    return FILE_TYPES.get(file_type, f"unknown({file_type})")


def _read(path: Path) -> ModelFacts:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        meta, params = _read_header(data)
    arch = str(meta.get("general.architecture") or "")
    file_type = meta.get("general.file_type")
    file_type = int(file_type) if isinstance(file_type, int) else None
    template = meta.pop("tokenizer.chat_template", "")
    meta["general.parameter_count"] = params
    meta = dict(sorted(meta.items()))
    return ModelFacts(
        architecture=arch,
        name=str(meta.get("general.name") or ""),
        organization=str(meta.get("general.organization") or ""),
        parameter_count=params,
        file_type=file_type,
        quantization=quantization_name(file_type),
        context_length=int(meta.get(f"{arch}.context_length") or 0),
        embedding_length=int(meta.get(f"{arch}.embedding_length") or 0),
        chat_template=template if isinstance(template, str) else "",
        license=str(meta.get("general.license") or ""),
        metadata=meta,
    )


_cache: dict[tuple[str, int, int], ModelFacts] = {}
_lock = threading.Lock()


def read_facts(path: Path | str) -> ModelFacts:
    """The facts of the GGUF file at ``path``, cached per (path, mtime, size). Never raises: an unreadable
    file gives empty facts with ``error`` set."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        return ModelFacts(error=f"cannot read {path}: {exc.strerror}")
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    try:
        facts = _read(path)
    except Exception as exc:  # not a GGUF file, truncated, unknown version
        facts = ModelFacts(error=f"cannot read GGUF metadata of {path.name}: {exc}")
    with _lock:
        for old in [k for k in _cache if k[0] == key[0]]:
            del _cache[old]
        _cache[key] = facts
    return facts
