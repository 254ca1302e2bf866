"""GGUF facts (gateway/gguf_info.py), the model catalog's capabilities, and Ollama's model bodies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from bus.protocol import WorkerInfo, WorkerState
from config.schema import ModelConfig, ModelParameters, embedding_args
from gateway import ollama_models as om
from gateway.catalog import ModelEntry, capabilities
from gateway.gguf_info import ModelFacts, human_number, quantization_name, read_facts


@pytest.mark.parametrize(("n", "text"), [
    (134515008, "134.52M"), (8030261248, "8.0B"), (7_000_000_000, "7B"), (12_000_000, "12M"), (12345, "12K"),
    (999, "999"),
])
def test_human_number_as_ollama(n: int, text: str) -> None:
    assert human_number(n) == text


def test_quantization_names() -> None:
    assert quantization_name(3) == "Q4_1" and quantization_name(15) == "Q4_K_M"
    assert quantization_name(0) == "F32" and quantization_name(1) == "F16" and quantization_name(None) == ""


def _write_gguf(path: Path, vocab: int) -> None:
    w = GGUFWriter(str(path), "llama")
    w.add_name("Tiny Test")
    w.add_context_length(4096)
    w.add_embedding_length(8)
    w.add_file_type(15)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}{% endif %}")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_tensor("token_embd.weight", np.zeros((vocab, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_read_facts_of_a_written_gguf(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, vocab=1000)
    f = read_facts(path)
    assert f.error == ""
    assert (f.architecture, f.context_length, f.embedding_length, f.quantization) == ("llama", 4096, 8, "Q4_K_M")
    assert f.parameter_count == 8000 and f.parameter_size == "8K"
    assert f.metadata["general.name"] == "Tiny Test"
    assert f.metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-5  # float32 shown in its short form
    assert f.metadata["tokenizer.ggml.tokens"] == []  # a long array is skipped, not parsed
    assert "tokenizer.chat_template" not in f.metadata and f.supports_tools
    assert read_facts(path) is f  # cached


def test_read_facts_never_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert "GGUF magic" in read_facts(bad).error
    assert read_facts(tmp_path / "missing.gguf").error


def test_embedding_args_are_added_once() -> None:
    p = ModelParameters(ctx_size=1024)
    assert embedding_args("chat", "mean", p) == []
    args = embedding_args("embedding", "mean", p)
    assert args == ["--embeddings", "--pooling", "mean", "-b", "1024", "-ub", "1024"]
    again = embedding_args("both", "mean", ModelParameters(ctx_size=1024, extra_args=args))
    assert again == args
    m = ModelConfig(model_path="x.gguf", mode="embedding", pooling="cls")
    assert m.backend_args()[:3] == ["--embeddings", "--pooling", "cls"]
    assert m.parameters.extra_args == []  # the config as written stays as written
    assert not m.serves_chat and m.serves_embeddings


def _entry(mode: str = "chat", facts: ModelFacts | None = None) -> ModelEntry:
    cfg = ModelConfig(model_path="x.gguf", mode=mode)  # type: ignore[arg-type]
    facts = facts or ModelFacts(architecture="llama", parameter_count=134515008, quantization="Q4_1",
                                metadata={"general.architecture": "llama"}, license="apache-2.0")
    return ModelEntry("m", cfg, Path("/models/x.gguf"), 1_700_000_000.0, 1234, facts)


def test_capabilities() -> None:
    assert capabilities(ModelConfig(model_path="x"), ModelFacts()) == ["completion"]
    assert capabilities(ModelConfig(model_path="x", mode="both"), ModelFacts(chat_template="{{ tools }}")) == [
        "completion", "tools", "embedding"]
    assert capabilities(ModelConfig(model_path="x", mode="embedding"), ModelFacts()) == ["embedding"]


def test_tags_and_show_bodies() -> None:
    e = _entry()
    tag = om.tags_entry(e)
    assert tag["details"] == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                              "parameter_size": "134.52M", "quantization_level": "Q4_1"}
    assert tag["modified_at"] == "2023-11-14T22:13:20.000000Z" and tag["size"] == 1234
    show = om.show_response(e)
    assert show["capabilities"] == ["completion"] and show["model_info"] == {"general.architecture": "llama"}
    assert show["license"] == "apache-2.0" and "FROM /models/x.gguf" in show["modelfile"]
    assert show["parameters"].split() == ["num_ctx", "2048", "num_thread", "1"]


def test_ps_entry_expiry() -> None:
    e = _entry()
    w = WorkerInfo(name="m", kind="llama", state=WorkerState.READY, expires_at=1_700_000_300.0, size_bytes=99)
    p = om.ps_entry(e, w, ttl=300, now=1_700_000_000.0)
    assert p["expires_at"] == "2023-11-14T22:18:20.000000Z" and p["size"] == 99 and p["size_vram"] == 0
    assert p["context_length"] == 2048
    busy = WorkerInfo(name="m", kind="llama", state=WorkerState.READY)
    assert om.ps_entry(e, busy, ttl=60, now=1_700_000_000.0)["expires_at"] == "2023-11-14T22:14:20.000000Z"
    assert om.ps_entry(e, busy, ttl=-1, now=1_700_000_000.0)["expires_at"].startswith("2318-")


def test_unsupported_endpoints_are_501_with_a_hint() -> None:
    err = om.unsupported("pull")
    assert err.status == 501 and "models_config.json" in err.message


def test_gateways_start_without_numpy_or_gguf() -> None:
    """gguf + numpy cost ~15 MB per gateway: loaded on first model description, not at startup."""
    import subprocess
    import sys

    code = ("import sys, gateway.ollama_app, gateway.openai_app, gateway.lmstudio; "
            "print(sorted(m for m in ('numpy', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
