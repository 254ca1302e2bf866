"""Whisper models in models_config.json, and the audio upload limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config.loader import DEFAULT_CONFIG_DIR, ConfigError, load_config


def write(tmp: Path, app: object, models: object) -> Path:
    (tmp / "app_config.json").write_text(json.dumps(app))
    (tmp / "models_config.json").write_text(json.dumps(models))
    return tmp


def test_shipped_config_has_tiny_en_from_a_local_directory() -> None:
    cfg = load_config(DEFAULT_CONFIG_DIR)
    m = cfg.models.models["whisper-tiny.en"]
    assert m.type == "whisper" and m.model_path == "faster-whisper-tiny.en" and "whisper-1" in m.aliases
    assert cfg.model_path(m) == cfg.models_root / "faster-whisper-tiny.en"  # under the models root, not a hub name
    assert (m.whisper.device, m.whisper.compute_type, m.whisper.cpu_threads) == ("cpu", "int8", 1)
    assert cfg.resolve_model("whisper-1") == "whisper-tiny.en"
    assert cfg.app.limits.max_upload_bytes == 25 * 1024 * 1024


def test_whisper_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"limits": {"max_upload_bytes": 1000}},
                            {"models": {"w": {"type": "whisper", "model_path": "/models/w"}}}))
    w = cfg.models.models["w"].whisper
    assert (w.device, w.compute_type, w.cpu_threads, w.beam_size, w.language) == ("cpu", "int8", 1, 5, None)
    assert cfg.app.limits.max_upload_bytes == 1000


@pytest.mark.parametrize(("whisper", "needle"), [
    ({"device": "tpu"}, "$.models.w.whisper.device"),
    ({"cpu_threads": 0}, "$.models.w.whisper.cpu_threads"),
    ({"beam_size": 0}, "$.models.w.whisper.beam_size"),
    ({"temperature": 1}, "temperature"),
])
def test_bad_whisper_settings_name_the_key(tmp_path: Path, whisper: dict[str, object], needle: str) -> None:
    models = {"models": {"w": {"type": "whisper", "model_path": "w", "whisper": whisper}}}
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {}, models))
    assert needle in str(err.value) and "models_config.json" in str(err.value)


def test_upload_limit_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$\.limits\.max_upload_bytes"):
        load_config(write(tmp_path, {"limits": {"max_upload_bytes": 0}}, {"models": {}}))
