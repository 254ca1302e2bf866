"""Config hot reload: what changed between two configs, and which workers that touches."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from bus.protocol import WorkerLaunch
from config.loader import Config

# App settings that only take effect at the next `llama-runner up` (listeners, paths).
RESTART_ONLY = ("host", "proxies", "dashboard", "metrics", "run_dir", "logs_dir", "llama_server_path")
HOT_PROXY_SETTINGS = ("api_keys", "cors_origins")  # (of proxies: the rest, ports, need a restart)


@dataclass
class ReloadPlan:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)  # app keys that changed but are not hot
    settings: list[str] = field(default_factory=list)  # app keys that changed and apply now (limits...)

    def summary(self) -> str:
        parts = [f"{k}: {', '.join(v)}" for k, v in (("added", self.added), ("changed", self.changed),
                                                       ("removed", self.removed), ("settings", self.settings)) if v]
        if self.needs_restart:
            parts.append(f"needs a restart of llama-runner to apply: {', '.join(self.needs_restart)}")
        return "; ".join(parts) or "no change"


def _restarting(launch: WorkerLaunch) -> WorkerLaunch:
    """What of a worker's launch needs a restart to change: not the supervisor's pid, nor limits.queue_size (it
    applies at the worker's next start: a change restarted every loaded model)."""
    return msgspec.structs.replace(launch, supervisor_pid=0, queue_size=0)


def plan(old: Config, new: Config, old_launches: dict[str, WorkerLaunch],
         new_launches: dict[str, WorkerLaunch]) -> ReloadPlan:
    p = ReloadPlan()
    for name, launch in new_launches.items():
        if name not in old_launches:
            p.added.append(name)
        elif _restarting(old_launches[name]) != _restarting(launch):
            p.changed.append(name)
    p.removed = [n for n in old_launches if n not in new_launches]
    for key in msgspec.structs.fields(new.app):
        if key.name == "proxies":  # a port's keys and CORS origins apply at once (the gateways re-read them)
            for proto in ("ollama", "lmstudio"):
                was, now = getattr(old.app.proxies, proto), getattr(new.app.proxies, proto)
                for f in msgspec.structs.fields(now):
                    if getattr(was, f.name) != getattr(now, f.name):
                        (p.settings if f.name in HOT_PROXY_SETTINGS else p.needs_restart).append(
                            f"proxies.{proto}.{f.name}")
        elif getattr(old.app, key.name) != getattr(new.app, key.name):
            (p.needs_restart if key.name in RESTART_ONLY else p.settings).append(key.name)
    return p
