"""The configured llama models as the APIs describe them: config entry, file, and GGUF facts.

Shared by the Ollama, OpenAI and LM Studio routes. GGUF metadata is read in a thread (cached per file).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path

from config.loader import Config
from config.schema import ModelConfig
from gateway.errors import ApiError
from gateway.gguf_info import ModelFacts, read_facts, template_takes_tools, template_thinks

__all__ = ["ModelEntry", "capabilities", "entries", "entry", "require_capability"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config: ModelConfig
    path: Path
    mtime: float
    size: int
    facts: ModelFacts
    present: bool = True  # the file is there (listings leave a missing one out, as Ollama lists only what it has)

    @property
    def digest(self) -> str:
        """A stable stand-in for the file's sha256 (hashing a multi-GB file per listing is too slow)."""
        return hashlib.sha256(f"{self.path}:{self.size}:{self.mtime}".encode()).hexdigest()

    @property
    def capabilities(self) -> list[str]:
        return capabilities(self.config, self.facts)

    @property
    def ctx_size(self) -> int:
        return self.config.parameters.ctx_size


def capabilities(model: ModelConfig, facts: ModelFacts) -> list[str]:
    """Ollama's capability names: ``completion`` (chat/generate), ``embedding``, ``tools`` (the chat template
    takes tools), ``thinking`` (it reasons first)."""
    out = []
    if model.serves_chat:
        out.append("completion")
        # the operator's template (extra_args) is the one llama-server uses; a built-in one by name ("") is not refused
        template = template_override(model)
        if facts.supports_tools if template is None else template == "" or template_takes_tools(template):
            out.append("tools")
        if facts.supports_thinking if template is None else template == "" or template_thinks(template):
            out.append("thinking")
    if model.serves_embeddings:
        out.append("embedding")
    return out


def template_override(model: ModelConfig) -> str | None:
    """The chat template a model's ``extra_args`` give llama-server instead of its GGUF's: a file's text
    (``--chat-template-file``), a template itself (``--chat-template '{% ... %}'``), "" for a built-in one by
    name (what it takes is not known here); None: the GGUF's."""
    args = list(model.parameters.extra_args)
    for i, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        if flag not in ("--chat-template-file", "--chat-template"):
            continue
        value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
        if flag == "--chat-template":
            return value if "{%" in value or "{{" in value else ""
        try:
            return Path(value).expanduser().read_text(errors="replace")
        except OSError:
            return ""
    return None


def _stat(path: Path) -> tuple[float, int] | None:
    try:
        st = path.stat()
        return st.st_mtime, st.st_size
    except OSError:
        return None


def _build(config: Config, name: str) -> ModelEntry:
    model = config.models.models[name]
    path = config.model_path(model)
    found = _stat(path)
    mtime, size = found or (0.0, 0)
    return ModelEntry(name, model, path, mtime, size, read_facts(path), found is not None)


async def entries(config: Config) -> list[ModelEntry]:
    """Every configured llama model whose file is there, in config order."""
    names = [n for n, m in config.models.models.items() if m.type == "llama"]
    built = await asyncio.to_thread(lambda: [_build(config, n) for n in names])
    return [e for e in built if e.present]


async def entry(config: Config, name: str, dialect: str = "model", present: bool = False) -> ModelEntry:
    """The llama model called ``name`` (a name, an alias, or ``name:latest``); ApiError(404) if unknown, or with
    ``present`` if its file is missing (a request to it says which file: the supervisor's load error)."""
    resolved = config.resolve_model(name) if name else None
    if resolved is None or config.models.models[resolved].type != "llama":
        raise ApiError(404, f"{dialect} '{name}' not found", code="model_not_found")
    found = await asyncio.to_thread(_build, config, resolved)
    if present and not found.present:
        raise ApiError(404, f"{dialect} '{name}' not found (its file is missing: {found.path})",
                       code="model_not_found")
    return found


def require_capability(config: Config, name: str, what: str) -> None:
    """Refuse (400) a request for ``what`` ("chat", "embeddings", or "load": any but speech) that the named model
    does not serve.
    Unknown names pass: the supervisor answers them with its own 404."""
    resolved = config.resolve_model(name)
    if resolved is None:
        return
    model = config.models.models[resolved]
    if model.type == "whisper":  # (refused here, before anything loads it: it would evict a model to say so)
        raise ApiError(400, f'model "{name}" is a speech-to-text model: it serves /v1/audio/transcriptions and '
                       "/v1/audio/translations only", code="model_not_supported", param="model")
    if what == "embeddings" and not model.serves_embeddings:
        raise ApiError(400, f'model "{name}" does not support embeddings (set "mode": "embedding" or "both" '
                       "in models_config.json)", code="model_not_supported", param="model")
    if what == "chat" and not model.serves_chat:
        raise ApiError(400, f'model "{name}" is an embedding model and does not support chat or completions',
                       code="model_not_supported", param="model")


def context_size(config: Config, name: str) -> int:
    """A model's context (per request: its ctx_size over its parallel slots); 0 for an unknown name."""
    resolved = config.resolve_model(name)
    if resolved is None:
        return 0
    params = config.models.models[resolved].parameters
    return max(1, params.ctx_size // max(1, params.parallel))


def require_media(config: Config, name: str, kind: str, param: str = "messages") -> None:
    """Refuse (400) a chat request with a ``kind`` content part ("image_url", "input_audio"...) for a model whose
    llama-server has no multimodal projector (it would answer 500). Unknown names pass, as above."""
    resolved = config.resolve_model(name)
    if resolved is None or config.models.models[resolved].serves_media:
        return
    raise ApiError(400, f'model "{name}" does not take {kind} content parts, only text (its llama-server needs a '
                   "multimodal projector, --mmproj in its extra_args)", code="model_not_supported", param=param)


async def require_features(config: Config, name: str, needed: dict[str, str]) -> None:
    """Refuse (400, in Ollama's words) a request that needs a capability ("thinking", "tools", "insert") of a
    model without it (Ollama refuses so; a model would ignore it silently). ``needed``: capability -> the
    request's field that asks for it."""
    if config.resolve_model(name) is None:
        return  # (the supervisor's 404)
    capabilities = (await entry(config, name)).capabilities
    for capability, param in needed.items():
        if capability not in capabilities:
            raise ApiError(400, f'"{name}" does not support {capability}', code="model_not_supported", param=param)
