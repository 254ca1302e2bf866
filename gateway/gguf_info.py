"""What a GGUF file says about its model: architecture, size, quantization, context length, metadata.

Read with the ``gguf`` package (maintained with llama.cpp). Its ``GGUFReader`` builds one numpy view per
element of every array field, which takes seconds on a tokenizer's 50k-150k token lists; the reader here
only changes that: arrays longer than :data:`MAX_ARRAY` are skipped over (their length is kept) instead
of parsed. Results are cached per file (path, mtime, size); reading is blocking, call it in a thread.
"""

from __future__ import annotations

import functools
import struct
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MAX_ARRAY", "ModelFacts", "human_number", "quantization_name", "read_facts"]

MAX_ARRAY = 64  # longer array fields (token lists, merges) are skipped, as Ollama hides them unless verbose


@functools.cache
def _reader_class() -> Any:
    """``GGUFReader`` that skips the content of long array fields (kept: their type and length).

    Built on first use: gguf and numpy cost a gateway ~15 MB of RSS, paid only once a model is described."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType

    class MetadataReader(GGUFReader):  # type: ignore[misc]
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            count, itype = int(alen[0]), GGUFValueType(int(raw_itype[0]))
            if count <= MAX_ARRAY or itype == GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            offs = orig_offs + 12
            if itype == GGUFValueType.STRING:
                fmt = "=Q" if self.byte_order == "I" else (">Q" if sys.byteorder == "little" else "<Q")
                data = self.data
                for _ in range(count):
                    offs += 8 + struct.unpack_from(fmt, data, offs)[0]  # type: ignore[arg-type]
            else:
                offs += count * np.dtype(self.gguf_scalar_to_np[itype]).itemsize
            # No data parts: ``contents()`` of the field is [].
            return offs - orig_offs, [raw_itype, alen], [], [GGUFValueType.ARRAY, itype]

    return MetadataReader


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
        return "tools" in self.chat_template


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
    from gguf import LlamaFileType

    if file_type is None:
        return ""
    try:
        name = LlamaFileType(file_type).name
    except ValueError:
        return f"unknown({file_type})"
    for prefix in ("MOSTLY_", "ALL_"):
        name = name.removeprefix(prefix)
    return name


def _value(field: Any) -> Any:
    import numpy as np
    from gguf import GGUFValueType

    main = field.types[0] if field.types else None
    value = field.contents()
    if main == GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))  # float32's shortest form: 1e-05, not 9.99999974e-06
    if main == GGUFValueType.ARRAY and field.types[-1] == GGUFValueType.FLOAT32:
        return [float(str(np.float32(v))) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def _read(path: Path) -> ModelFacts:
    reader = _reader_class()(str(path), "r")
    meta = {key: _value(fld) for key, fld in reader.fields.items() if not key.startswith("GGUF.")}
    arch = str(meta.get("general.architecture") or "")
    params = int(sum(t.n_elements for t in reader.tensors))
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
