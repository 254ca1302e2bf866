"""Embeddings: Ollama ``/api/embed`` and ``/api/embeddings``, OpenAI ``/v1/embeddings`` ⇄ llama-server.

llama-server's ``POST /v1/embeddings`` (started with ``--embeddings``) takes a string, a list of strings
or token lists, and answers L2-normalized float vectors with their ``index``. Everything else happens
here: ``dimensions`` (keep the first n values, normalize again, as Ollama and OpenAI do), base64
encoding, and each protocol's reply. Pure functions; invalid input raises ``ApiError(400)`` only.
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass
from typing import Any

from gateway.errors import ApiError

__all__ = [
    "EMBEDDINGS_PATH",
    "EmbedRequest",
    "fit_dimensions",
    "is_too_long",
    "ollama_embed_request",
    "ollama_embed_response",
    "ollama_embeddings_request",
    "openai_embeddings_request",
    "openai_embeddings_response",
    "vectors_from_backend",
]

EMBEDDINGS_PATH = "/v1/embeddings"


@dataclass(frozen=True)
class EmbedRequest:
    """What to embed. ``inputs``: strings, or token-id lists (OpenAI); may be empty (Ollama: just load)."""

    inputs: list[Any]
    truncate: bool = True
    dimensions: int | None = None
    encoding_format: str = "float"
    normalize: bool = True  # L2-normalized vectors (Ollama's legacy /api/embeddings: the model's own)

    def backend_body(self, model: str, inputs: list[Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "input": self.inputs if inputs is None else inputs,
                                "encoding_format": "float"}
        if not self.normalize:
            body["embd_normalize"] = -1  # (llama-server's default is 2: Euclidean)
        return body


def _dimensions(req: dict[str, Any], zero_is_unset: bool = False) -> int | None:
    value = req.get("dimensions")
    if value is None or (zero_is_unset and value == 0 and not isinstance(value, bool)):
        return None  # (Ollama's /api/embed reads 0 as not set: the model's own vector)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, "invalid dimensions: must be a positive integer", param="dimensions")
    return value


def _object(req: Any, need_model: bool = True) -> dict[str, Any]:
    if not isinstance(req, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = req.get("model")
    if (need_model or model is not None) and (not isinstance(model, str) or not model):
        raise ApiError(400, "model is required", param="model")
    return req


def ollama_embed_request(req: Any) -> EmbedRequest:
    """Ollama ``/api/embed``: ``input`` is a string or a list of strings; ``truncate`` (default true) cuts
    inputs to the context length instead of failing."""
    req = _object(req)
    value = req.get("input")
    if value is None or value == "":
        inputs: list[Any] = []
    elif isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and all(isinstance(s, str) for s in value):
        inputs = list(value)
    else:
        raise ApiError(400, "invalid input: must be a string or a list of strings", param="input")
    truncate = req.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise ApiError(400, "invalid truncate: must be a boolean", param="truncate")
    options = req.get("options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "invalid options: must be an object", param="options")
    return EmbedRequest(inputs, truncate is not False, _dimensions(req, zero_is_unset=True))


def ollama_embeddings_request(req: Any) -> EmbedRequest:
    """Ollama's legacy ``/api/embeddings``: one ``prompt`` string (empty: just load the model); its vector is
    the model's own, not normalized (as Ollama's; ``/api/embed`` normalizes)."""
    req = _object(req)
    prompt = req.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ApiError(400, "invalid prompt: must be a string", param="prompt")
    return EmbedRequest([prompt] if prompt else [], True, normalize=False)


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def openai_embeddings_request(req: Any) -> EmbedRequest:
    """OpenAI ``/v1/embeddings``: ``input`` is a string, a list of strings, a token list, or a list of token
    lists; ``encoding_format`` is ``float`` (default) or ``base64``. ``model`` may be left out (LM Studio's
    default model answers)."""
    req = _object(req, need_model=False)
    value = req.get("input")
    if value is None:
        raise ApiError(400, "input is required", param="input")
    if isinstance(value, str):
        inputs: list[Any] = [value]
    elif _is_token_list(value) and value:
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(s, str) or _is_token_list(s) for s in value):
        inputs = list(value)
    else:
        raise ApiError(400, "invalid input: must be a string, a non-empty list of strings, or token ids",
                       param="input")
    fmt = req.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, "invalid encoding_format: must be 'float' or 'base64'", param="encoding_format")
    return EmbedRequest(inputs, False, _dimensions(req), fmt)


def vectors_from_backend(body: Any) -> tuple[list[list[float]], int]:
    """llama-server's ``/v1/embeddings`` reply -> (vectors in input order, prompt token count)."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ApiError(502, "backend sent an embeddings reply without data", source="backend")
    items = sorted((d for d in body["data"] if isinstance(d, dict)), key=lambda d: d.get("index", 0))
    vectors = []
    for item in items:
        emb = item.get("embedding")
        if isinstance(emb, list) and emb and isinstance(emb[0], list):  # pooling none: one per token
            emb = emb[0]
        if not isinstance(emb, list):
            raise ApiError(502, "backend sent an embedding that is not a list of numbers", source="backend")
        vectors.append(emb)
    usage = body.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return vectors, tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else 0


def fit_dimensions(vector: list[float], dimensions: int | None) -> list[float]:
    """The first ``dimensions`` values, L2-normalized again (unchanged if None or not shorter)."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.hypot(*head)  # (no underflow of tiny values' squares: their sum was not their norm)
    return [v / norm for v in head] if norm > 0 else head


def is_too_long(err: ApiError) -> bool:
    """Whether llama-server refused an input for being longer than its batch / context."""
    text = err.message.lower()
    return "too large" in text or "exceeds the available context" in text or "context size" in text


def ollama_embed_response(model: str, vectors: list[list[float]], prompt_tokens: int, total_ns: int,
                          load_ns: int, dimensions: int | None = None) -> dict[str, Any]:
    return {
        "model": model,
        "embeddings": [fit_dimensions(v, dimensions) for v in vectors],
        "total_duration": max(total_ns, 0),
        "load_duration": max(load_ns, 0),
        "prompt_eval_count": prompt_tokens,
    }


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()  # little-endian float32


def openai_embeddings_response(model: str, vectors: list[list[float]], prompt_tokens: int,
                               req: EmbedRequest) -> dict[str, Any]:
    data = []
    for i, v in enumerate(vectors):
        if req.dimensions is not None and req.dimensions > len(v):  # (OpenAI's answer too: a 400)
            raise ApiError(400, f"invalid dimensions: {req.dimensions} is more than the model's {len(v)}",
                           param="dimensions")
        v = fit_dimensions(v, req.dimensions)
        data.append({"object": "embedding", "index": i,
                     "embedding": _base64(v) if req.encoding_format == "base64" else v})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
