"""``/metrics``: the bus figures in Prometheus' text format (``llama_runner_*``), from the hub's latest state.

A custom collector on a private registry: every scrape reads what the hub holds at that moment, so a worker
that went away disappears from the next scrape instead of lingering as a stale series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dashboard.hub import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("stopped", "starting", "ready", "stopping", "backoff", "fatal")

# (field, metric suffix, help, counter?)
WORKER_FIGURES = (
    ("cpu_percent", "cpu_percent", "CPU use of the worker and its llama-server, percent of one core", False),
    ("rss_bytes", "rss_bytes", "Resident memory of the worker and its llama-server", False),
    ("in_flight", "requests_in_flight", "Requests being served", False),
    ("queued", "requests_queued", "Requests waiting for a slot", False),
    ("requests_total", "requests", "Requests received by the worker", True),
    ("errors_total", "errors", "Requests that failed at the worker or its backend", True),
    ("tokens_total", "tokens_generated", "Tokens generated", True),
    ("tokens_per_s", "tokens_per_second", "Tokens generated per second over the last second", False),
    ("ttft_last_s", "ttft_last_seconds", "Time to first token of the latest request", False),
    ("ttft_p50_s", "ttft_p50_seconds", "Median time to first token over the last 100 requests", False),
    ("uptime_s", "uptime_seconds", "Seconds since the worker process started", False),
    ("restarts", "restarts", "Restarts of the worker by the supervisor", True),
)
GATEWAY_FIGURES = (
    ("requests_total", "requests", "HTTP requests received", True),
    ("requests_per_s", "requests_per_second", "HTTP requests per second over the last second", False),
    ("errors_total", "errors", "Answers with status >= 500", True),
    ("client_errors_total", "client_errors", "Answers with status 4xx", True),
    ("in_flight", "requests_in_flight", "HTTP requests being served", False),
    ("open_streams", "open_streams", "Streaming responses open", False),
    ("rss_bytes", "rss_bytes", "Resident memory of the gateway", False),
)


def _family(name: str, help_: str, counter: bool, labels: list[str]) -> Any:
    if counter:
        return CounterMetricFamily(name, help_, labels=labels)
    return GaugeMetricFamily(name, help_, labels=labels)


class HubCollector(Collector):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        workers = list(self.hub.workers.values())
        state = GaugeMetricFamily("llama_runner_worker_state", "1 for the state the worker is in",
                                  labels=["model", "state"])
        up = GaugeMetricFamily("llama_runner_worker_up", "1 when the worker is ready to serve", labels=["model"])
        for w in workers:
            name, current = str(w.get("name", "")), str(w.get("state", "stopped"))
            for s in STATES:
                state.add_metric([name, s], 1.0 if s == current else 0.0)
            up.add_metric([name], 1.0 if current == "ready" else 0.0)
        yield state
        yield up
        for field, suffix, help_, counter in WORKER_FIGURES:
            fam = _family(f"llama_runner_worker_{suffix}", help_, counter, ["model"])
            for w in workers:
                if field in w:
                    fam.add_metric([str(w.get("name", ""))], float(w[field] or 0))
            yield fam
        gateways = list(self.hub.gateways.values())
        for field, suffix, help_, counter in GATEWAY_FIGURES:
            fam = _family(f"llama_runner_gateway_{suffix}", help_, counter, ["protocol"])
            for g in gateways:
                fam.add_metric([str(g.get("protocol", ""))], float(g.get(field) or 0))
            yield fam
        proc = GaugeMetricFamily("llama_runner_process_up", "1 when a gateway or the dashboard is running",
                                 labels=["process"])
        restarts = CounterMetricFamily("llama_runner_process_restarts", "Restarts of a gateway or the dashboard",
                                       labels=["process"])
        for name, p in sorted(self.hub.processes.items()):
            proc.add_metric([name], 1.0 if p.get("state") == "running" else 0.0)
            restarts.add_metric([name], float(p.get("restarts") or 0))
        yield proc
        yield restarts
        system = self.hub.system
        if system:
            for field, suffix, help_ in (
                ("cpu_percent", "cpu_percent", "Host CPU use, percent"),
                ("memory_percent", "memory_percent", "Host memory in use, percent"),
                ("memory_used_bytes", "memory_used_bytes", "Host memory in use"),
                ("memory_total_bytes", "memory_total_bytes", "Host memory"),
            ):
                gauge = GaugeMetricFamily(f"llama_runner_system_{suffix}", help_)
                gauge.add_metric([], float(system.get(field) or 0))
                yield gauge
            load = system.get("load_avg") or []
            if load:
                gauge = GaugeMetricFamily("llama_runner_system_load1", "Host load average over one minute")
                gauge.add_metric([], float(load[0]))
                yield gauge


def registry(hub: Hub) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(HubCollector(hub))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
