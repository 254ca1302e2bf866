"""GGUF facts (gateway/gguf_info.py), the model catalog's capabilities, and Ollama's model bodies."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFWriter
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.protocol import WorkerInfo, WorkerState
from config.schema import ModelConfig, ModelParameters, llama_server_args
from gateway import ollama_models as om
from gateway.catalog import ModelEntry, capabilities
from gateway.gguf_info import (
    FILE_TYPES,
    ModelFacts,
    human_number,
    quantization_name,
    read_facts,
    short_float32,
)


@pytest.mark.parametrize(("n", "text"), [
    (134515008, "134.52M"), (8030261248, "8.0B"), (7_000_000_000, "7B"), (12_000_000, "12M"), (12345, "12K"),
    (999, "999"),
])
def test_human_number_as_ollama(n: int, text: str) -> None:
    assert human_number(n) == text


def test_quantization_names() -> None:
    assert quantization_name(3) == "Q4_1" and quantization_name(15) == "Q4_K_M"
    assert quantization_name(0) == "F32" and quantization_name(1) == "F16" and quantization_name(None) == ""
    assert quantization_name(999) == "unknown(999)"


def test_quantization_names_are_llama_cpp_file_types() -> None:
    """Our table is llama.cpp's llama_ftype as the gguf package (maintained with llama.cpp) names it."""
    from gguf import LlamaFileType

    theirs = {t.value: t.name.removeprefix("MOSTLY_").removeprefix("ALL_") for t in LlamaFileType}
    assert FILE_TYPES == theirs


@settings(max_examples=500, deadline=None)
@given(bits=st.integers(min_value=0, max_value=2**32 - 1))
def test_short_float32_is_numpys_shortest_form(bits: int) -> None:
    x = np.frombuffer(struct.pack("<I", bits), dtype=np.float32)[0]
    if not np.isfinite(x):
        return
    assert short_float32(float(x)) == float(str(x))


def _reference_facts(path: Path) -> tuple[dict[str, Any], int]:
    """What the gguf package's own reader finds (all of every array; long arrays then emptied as we do)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path), "r")
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = fld.contents()
        main = fld.types[0] if fld.types else None
        if main == GGUFValueType.FLOAT32:
            value = float(str(np.float32(value)))
        elif main == GGUFValueType.ARRAY:
            if len(value) > 64 and fld.types[1] != GGUFValueType.ARRAY:
                value = []
            elif fld.types[-1] == GGUFValueType.FLOAT32:
                value = [float(str(np.float32(v))) for v in value]
        meta[key] = value
    return meta, int(sum(t.n_elements for t in reader.tensors))


def _write_every_type(path: Path, endianess: Any) -> None:
    from gguf import GGUFEndian

    w = GGUFWriter(str(path), "llama", endianess=GGUFEndian.BIG if endianess == "big" else GGUFEndian.LITTLE)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo \u2028 wörld")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [1e-5, 0.1, 3.0])
    w.add_array("t.strs", ["a", "bé", ""])
    w.add_array("t.long_strs", [f"tok{i}" for i in range(100)])
    w.add_array("t.long_ints", list(range(1000)))
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("a", np.zeros((3, 5), dtype=np.float32))
    w.add_tensor("b", np.zeros((7,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("endianess", ["little", "big"])
def test_our_reader_finds_what_the_gguf_package_finds(tmp_path: Path, endianess: str) -> None:
    path = tmp_path / f"every-{endianess}.gguf"
    _write_every_type(path, endianess)
    from gateway.gguf_info import _read_header

    with path.open("rb") as f:
        meta, params = _read_header(f.read())
    ref_meta, ref_params = _reference_facts(path)
    assert meta.pop("t.nested") == [[1, 2], [3]]  # (the package's contents() flattens arrays of arrays)
    ref_meta.pop("t.nested")
    assert (meta, params) == (ref_meta, ref_params)
    assert meta["t.f32"] == 0.1 and meta["t.long_strs"] == [] and meta["t.strs"] == ["a", "bé", ""]
    assert params == 22


def test_the_default_model_reads_as_the_gguf_package_reads_it() -> None:
    from config.loader import load_config

    cfg = load_config(None)
    model = cfg.models.models.get(cfg.models.default_model or "")
    path = cfg.model_path(model) if model else None
    if path is None or not path.exists():
        pytest.skip("the default model is not downloaded (make setup)")
    facts = read_facts(path)
    meta, params = _reference_facts(path)
    template = meta.pop("tokenizer.chat_template", "")
    meta["general.parameter_count"] = params
    assert facts.error == "" and facts.metadata == dict(sorted(meta.items()))
    assert facts.chat_template == template and facts.parameter_count == params


def test_reading_a_model_imports_no_numpy(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "tiny.gguf"
    _write_gguf(path, vocab=300)
    code = ("import sys; from gateway.gguf_info import read_facts; "
            f"f = read_facts({str(path)!r}); assert f.error == '' and f.parameter_count == 2400, f; "
            "assert 'numpy' not in sys.modules and 'gguf' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


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


def test_llama_server_args_are_added_once() -> None:
    p = ModelParameters(ctx_size=1024)
    assert llama_server_args("chat", "mean", p) == ["--cache-ram", "512", "-b", "512"]
    args = llama_server_args("embedding", "mean", p)
    assert args == ["--cache-ram", "512", "--embeddings", "--pooling", "mean", "-b", "1024", "-ub", "1024"]
    again = llama_server_args("both", "mean", ModelParameters(ctx_size=1024, extra_args=args))
    assert again == args
    m = ModelConfig(model_path="x.gguf", mode="embedding", pooling="cls")
    assert m.backend_args()[2:5] == ["--embeddings", "--pooling", "cls"]
    assert m.parameters.extra_args == []  # the config as written stays as written
    assert not m.serves_chat and m.serves_embeddings


def test_the_prompt_cache_is_bounded_unless_the_model_says_otherwise() -> None:
    """llama-server's own default (8 GiB) let a worker grow from 0.2 to 1.5 GB over a few hundred prompts."""
    assert ModelConfig(model_path="x.gguf").backend_args() == ["--cache-ram", "512", "-b", "512"]
    own = ModelConfig(model_path="x.gguf", parameters=ModelParameters(cache_ram_mib=-1, extra_args=["-t", "2"]))
    assert own.backend_args() == ["-t", "2", "--cache-ram", "-1", "-b", "512"]
    for flags in (["-cram", "64"], ["--cache-ram=64"]):
        args = ModelConfig(model_path="x.gguf", parameters=ModelParameters(extra_args=flags)).backend_args()
        assert args == [*flags, "-b", "512"]


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
    qwen3 = "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>' }}"
    assert capabilities(ModelConfig(model_path="x"), ModelFacts(chat_template=qwen3)) == ["completion", "thinking"]


def test_capabilities_of_a_template_given_in_extra_args(tmp_path: Path) -> None:
    """The operator's chat template (extra_args) is the one llama-server uses: its tools count, not the GGUF's
    (a model given a tool template was refused "does not support tools")."""
    from config.schema import ModelParameters as ModelParams

    tpl = tmp_path / "tools.jinja"
    tpl.write_text("{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")
    plain = ModelFacts(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")

    def with_args(*args: str) -> ModelConfig:
        return ModelConfig(model_path="x", parameters=ModelParams(extra_args=list(args)))

    assert capabilities(with_args("--jinja", "--chat-template-file", str(tpl)), plain) == ["completion", "tools"]
    assert capabilities(with_args(f"--chat-template-file={tpl}"), plain) == ["completion", "tools"]
    assert "tools" in capabilities(with_args("--chat-template", "chatml"), plain)  # (a built-in: not refused)
    assert capabilities(with_args("--chat-template", "{{ messages }}"), ModelFacts(chat_template="tools")) == [
        "completion"]  # (one given inline, without tools)


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
    # kept loaded by a request's keep_alive -1, whatever the model's idle TTL
    kept = WorkerInfo(name="m", kind="llama", state=WorkerState.READY, expires_at=-1.0)
    assert om.ps_entry(e, kept, ttl=300, now=1_700_000_000.0)["expires_at"].startswith("2318-")


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


def test_ollama_lists_names_with_their_tag() -> None:
    assert om.tagged("smollm2") == "smollm2:latest" and om.tagged("qwen2.5:7b") == "qwen2.5:7b"
    e = _entry()
    assert om.tags_entry(e)["name"] == om.tags_entry(e)["model"] == e.name + ":latest"
