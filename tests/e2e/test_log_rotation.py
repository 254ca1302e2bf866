"""The real system keeps its logs bounded: with ``log_max_bytes`` small, llama-server's output and every
process's log are rotated and no log file grows past it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ollama
import pytest

from tests.conftest import ROOT, running_system

pytestmark = pytest.mark.e2e
MAX = 4096


def test_logs_rotate_at_the_configured_size() -> None:
    cfg = Path(tempfile.mkdtemp(prefix="lr-cfglog-"))
    app = json.loads((ROOT / "config" / "app_config.json").read_text())
    app.update(log_max_bytes=MAX, log_backups=2)
    (cfg / "app_config.json").write_text(json.dumps(app))
    (cfg / "models_config.json").write_text((ROOT / "config" / "models_config.json").read_text())
    with running_system(cfg, remove_config_dir=True) as sysm:
        client = ollama.Client(host=sysm.ollama_url)
        for i in range(12):  # llama-server writes about 1 KB of timings for each
            client.generate(model="smollm2", prompt=f"Count to {i}.", options={"num_predict": 4})
        logs = sysm.logs_dir
        rotated = sorted(p.name for p in logs.glob("*.log.*"))
        assert "worker-smollm2.llama-server.log.1" in rotated, sorted(p.name for p in logs.iterdir())
        assert not any(p.name.endswith(".log.3") for p in logs.iterdir())
        too_big = {p.name: p.stat().st_size for p in logs.glob("*.log*") if p.stat().st_size > MAX}
        assert not too_big
