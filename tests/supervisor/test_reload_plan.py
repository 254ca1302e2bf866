"""What a config reload changes (supervisor/reload.py) and the restart policy it applies at once."""

from __future__ import annotations

import json
from pathlib import Path

from config.loader import Config, load_config
from supervisor.main import Supervisor
from supervisor.reload import plan

MODELS = {"default_model": "m", "models": {"m": {"model_path": "m.gguf"}}}


def config(tmp: Path, app: dict[str, object]) -> Config:
    (tmp / "app_config.json").write_text(json.dumps(app))
    (tmp / "models_config.json").write_text(json.dumps(MODELS))
    return load_config(tmp)


def test_settings_that_apply_now_and_those_that_need_a_restart(tmp_path: Path) -> None:
    old = config(tmp_path, {})
    new = config(tmp_path, {"limits": {"max_restarts": 2}, "proxies": {"ollama": {"port": 11999}}})
    p = plan(old, new, {}, {})
    assert p.settings == ["limits"] and p.needs_restart == ["proxies.ollama.port"]
    assert "settings: limits" in p.summary() and "needs a restart" in p.summary()
    assert plan(old, old, {}, {}).summary() == "no change"


async def test_a_ports_keys_are_a_change_that_applies_now(tmp_path: Path) -> None:
    """Keys and CORS origins apply at once (the gateways re-read them): a reload that added keys said "no change"
    (the supervisor kept the proxies of `up` whole, for its ports)."""
    old = config(tmp_path, {})
    sup = Supervisor(old, tmp_path / "run", tmp_path / "logs")
    try:
        new = sup._overrides(config(tmp_path, {"proxies": {"lmstudio": {"api_keys": ["k1"], "port": 4321},
                                                           "ollama": {"cors_origins": ["*"]}}}))
    finally:
        sup.ctx.term()
    assert new.app.proxies.lmstudio.port == old.app.proxies.lmstudio.port  # (`up`'s ports stay)
    p = plan(old, new, {}, {})
    assert p.settings == ["proxies.ollama.cors_origins", "proxies.lmstudio.api_keys"] and not p.needs_restart


async def test_a_reload_changes_the_restart_policy_every_worker_shares(tmp_path: Path) -> None:
    sup = Supervisor(config(tmp_path, {}), tmp_path / "run", tmp_path / "logs")
    try:
        shared = sup.policy
        limits = {"max_restarts": 2, "restart_backoff_s": 0.25, "restart_backoff_max_s": 3.0, "shutdown_grace_s": 1.5}
        sup._apply_limits(config(tmp_path, {"limits": limits}))
        assert sup.policy is shared  # (the managers hold this object)
        assert (shared.max_failures, shared.backoff_s, shared.backoff_max_s, shared.grace_s) == (2, 0.25, 3.0, 1.5)
    finally:
        sup.ctx.term()



def test_a_queue_size_change_restarts_no_worker(tmp_path: Path) -> None:
    """(limits.queue_size is in a worker's launch: a change restarted every loaded model; it applies at the next start.)"""
    import msgspec

    from bus.protocol import WorkerLaunch

    old = config(tmp_path, {})
    new = config(tmp_path, {"limits": {"queue_size": 3}})
    launch = WorkerLaunch(name="m", kind="llama", model_path="/m.gguf", run_dir="/r", logs_dir="/l", supervisor_pid=1)
    p = plan(old, new, {"m": launch}, {"m": msgspec.structs.replace(launch, queue_size=3)})
    assert p.changed == [] and p.settings == ["limits"]
