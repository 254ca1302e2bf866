"""A running system with two chat models on the same GGUF (restart one, the other keeps streaming)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    System,
    require_runtime,
    running_system,
    wait_for,
)

MODEL_A = "smollm2"
MODEL_B = "smollm2-b"


def two_model_config() -> Path:
    base = json.loads((ROOT / "config" / "models_config.json").read_text())
    a = dict(base["models"][base["default_model"]])
    a["aliases"] = []
    a["parameters"] = {**a.get("parameters", {}), "parallel": 2}
    models = {"default_model": MODEL_A, "preload": [MODEL_A, MODEL_B],
              "models": {MODEL_A: a, MODEL_B: dict(a)}}
    app = json.loads((ROOT / "config" / "app_config.json").read_text())
    app["limits"] = {**app.get("limits", {}), "idle_ttl_s": -1, "max_loaded_models": 2}
    cfg = Path(tempfile.mkdtemp(prefix="lr-dash-cfg-"))
    (cfg / "models_config.json").write_text(json.dumps(models, indent=2))
    (cfg / "app_config.json").write_text(json.dumps(app, indent=2))
    return cfg


@pytest.fixture(scope="package")
def two_models() -> Iterator[System]:
    require_runtime()
    with running_system(two_model_config(), remove_config_dir=True) as sysm:
        wait_for(lambda: all(w["state"] == "ready" for w in sysm.status()["workers"]), 120,
                 "both preloaded models to be ready")
        yield sysm
