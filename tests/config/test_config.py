"""Config loading: the shipped defaults load; every error names the file and the key path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config.loader import DEFAULT_CONFIG_DIR, ConfigError, load_config


def write(tmp: Path, app: object, models: object) -> Path:
    (tmp / "app_config.json").write_text(app if isinstance(app, str) else json.dumps(app))
    (tmp / "models_config.json").write_text(models if isinstance(models, str) else json.dumps(models))
    return tmp


MODELS = {"default_model": "m", "models": {"m": {"model_path": "m.gguf"}}}


def test_shipped_defaults_load() -> None:
    cfg = load_config(DEFAULT_CONFIG_DIR)
    assert cfg.app.host == "127.0.0.1"
    assert cfg.app.proxies.ollama.port == 11434 and cfg.app.proxies.lmstudio.port == 1234
    assert cfg.models.default_model in cfg.models.models


def test_defaults_fill_missing_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {}, MODELS))
    assert cfg.app.dashboard.port == 8585
    assert cfg.models.models["m"].parameters.threads == 1


@pytest.mark.parametrize(("app", "needle"), [
    ({"proxies": {"ollama": {"port": "x"}}}, "$.proxies.ollama.port"),
    ({"proxies": {"ollama": {"port": 70000}}}, "$.proxies.ollama.port"),
    ({"limits": {"queue_size": -1}}, "$.limits.queue_size"),
    ({"unknown_key": 1}, "unknown_key"),
])
def test_app_errors_name_file_and_key(tmp_path: Path, app: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, app, MODELS))
    assert "app_config.json" in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize(("models", "needle"), [
    ({"models": {"m": {}}}, "model_path"),
    ({"models": {"m": {"model_path": "x", "parameters": {"threads": 0}}}}, "$.models.m.parameters.threads"),
    ({"models": {"../etc": {"model_path": "x"}}}, "$.models"),
    ({"default_model": "nope", "models": {"m": {"model_path": "x"}}}, "$.default_model"),
    ({"models": {"a": {"model_path": "x", "aliases": ["b"]}, "b": {"model_path": "y"}}}, "`b`"),
    # the names clients' names reach regardless of case and of ":latest" (one of the two was out of reach)
    ({"models": {"smolC": {"model_path": "x"}, "smolC:latest": {"model_path": "y"}}}, "`smolC:latest` (as `smolC`"),
    ({"models": {"smolC": {"model_path": "x"}, "SMOLC": {"model_path": "y"}}}, "used by both `smolC` and `SMOLC`"),
    ({"models": {"a": {"model_path": "x", "aliases": ["Q"]}, "q:latest": {"model_path": "y"}}}, "`q:latest`"),
    # which name is wrong (it said "at `key` in `$.models`")
    ({"models": {"m": {"model_path": "x"}, "My Model": {"model_path": "y"}}}, "model name 'My Model' is not valid"),
    # preloads beyond what may be loaded at once (all were started)
    ({"preload": ["a", "b", "c"], "models": {k: {"model_path": k} for k in "abc"}},
     "more than limits.max_loaded_models (2)"),
])
def test_model_errors_name_file_and_key(tmp_path: Path, models: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {}, models))
    assert "models_config.json" in str(err.value) and needle in str(err.value)


def test_preload_takes_aliases(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {}, {"preload": ["w1"], "models": {"w": {"model_path": "w", "aliases": ["w1"]}}}))
    assert cfg.resolve_model(cfg.models.preload[0]) == "w"  # (it was "not a configured model")


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(write(tmp_path, "{", MODELS))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nowhere")


def test_resolve_model_names_aliases_and_latest(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {}, {"default_model": "m", "models": {
        "m": {"model_path": "m.gguf", "aliases": ["mm"]}}}))
    assert cfg.resolve_model("m") == "m"
    assert cfg.resolve_model("m:latest") == "m"
    assert cfg.resolve_model("mm") == "m"
    assert cfg.resolve_model("") == "m"
    assert cfg.resolve_model("other") is None
    assert cfg.resolve_model("M") == cfg.resolve_model("MM:Latest") == "m"  # regardless of case, as Ollama
    assert cfg.model_path(cfg.models.models["m"]) == cfg.models_root / "m.gguf"


def test_a_model_takes_media_parts_only_with_a_projector(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {}, {"default_model": "m", "models": {
        "m": {"model_path": "m.gguf"},
        "v": {"model_path": "v.gguf", "parameters": {"extra_args": ["--mmproj", "p.gguf"]}},
        "w": {"model_path": "w.gguf", "parameters": {"extra_args": ["--mmproj=p.gguf"]}},
        "e": {"model_path": "e.gguf", "mode": "embedding", "parameters": {"extra_args": ["-mm", "p.gguf"]}},
    }}))
    media = {name: m.serves_media for name, m in cfg.models.models.items()}
    assert media == {"m": False, "v": True, "w": True, "e": False}


def test_a_models_estimated_footprint_counts_its_prompt_cache() -> None:
    from config.schema import ModelConfig, ModelParameters

    mib = 1 << 20
    p = ModelParameters(ctx_size=1000, parallel=2)
    assert ModelConfig(model_path="m.gguf", parameters=p).footprint(100 * mib, 10) == 100 * mib + 20_000 + 512 * mib
    unbounded = ModelParameters(ctx_size=1000, parallel=2, cache_ram_mib=-1)
    assert ModelConfig(model_path="m.gguf", parameters=unbounded).footprint(100 * mib, 10) == 100 * mib + 20_000
    assert ModelConfig(model_path="m.gguf", memory_bytes=5, parameters=p).footprint(100 * mib, 10) == 5
    assert ModelConfig(model_path="w", type="whisper", parameters=p).footprint(100 * mib, 10) == 100 * mib + 20_000
    own = ModelParameters(ctx_size=1000, parallel=2, extra_args=["-cram", "64"])  # (what llama-server is given)
    assert ModelConfig(model_path="m.gguf", parameters=own).footprint(100 * mib, 10) == 100 * mib + 20_000 + 64 * mib
    own = ModelParameters(ctx_size=1000, parallel=2, extra_args=["--cache-ram=128"])
    assert ModelConfig(model_path="m.gguf", parameters=own).footprint(100 * mib, 10) == 100 * mib + 20_000 + 128 * mib


def test_a_chat_models_prompt_goes_to_llama_server_in_batches_a_cancel_can_come_between() -> None:
    """llama-server sees a cancel between two batches of a prompt: with its own 2048 a client that gave up on a long
    prompt (an editor's completion as the user types on) held the model 7-10 s; Ollama's num_batch is 512."""
    from config.schema import CHAT_BATCH, ModelParameters, llama_server_args

    assert CHAT_BATCH == 512
    args = llama_server_args("chat", None, ModelParameters())
    assert args[args.index("-b") + 1] == "512"
    for own in (["-b", "64"], ["--batch-size", "64"], ["--batch-size=64"]):  # (the model's own wins)
        args = llama_server_args("chat", None, ModelParameters(extra_args=own))
        assert args == [*own, "--cache-ram", "512"], args
    embed = llama_server_args("embedding", None, ModelParameters(ctx_size=1000))  # (an input in one batch)
    assert embed[embed.index("-b") + 1] == "1000"


def test_a_models_size_on_disk_is_its_files_own(tmp_path: Path) -> None:
    """A whisper model is a directory: its size was the directory's own (4096), in status and the memory budget."""
    from config.loader import model_size

    d = tmp_path / "whisper"
    (d / "sub").mkdir(parents=True)
    (d / "model.bin").write_bytes(b"x" * 10_000)
    (d / "sub" / "vocab.txt").write_bytes(b"y" * 500)
    assert model_size(d) == 10_500
    assert model_size(d / "model.bin") == 10_000
    assert model_size(tmp_path / "missing") == 0
