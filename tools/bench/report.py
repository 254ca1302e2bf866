"""The machine's description, the targets (PASS/MISS), BENCHMARKS.md and BENCHMARKS.json."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil

from tools.bench.figures import GATEWAYS as GATEWAY_PATHS
from tools.bench.figures import ONE_HOP, REFERENCE
from tools.bench.instance import ROOT


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    distro = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=5
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "os": distro,
        "git_commit": commit,
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------------- targets
def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(upstream: str, what: str, value: float, op: str, limit: float, unit: str = "", why_na: str = "") -> None:
        """A target; ``why_na``: the run cannot judge it (then neither PASS nor MISS)."""
        if math.isnan(value) and not why_na:
            why_na = "no measurement"
        ok = (value >= limit) if op == ">=" else (value < limit)
        out.append(
            {
                "upstream": upstream,
                "target": what,
                "value": value,
                "op": op,
                "limit": limit,
                "unit": unit,
                "pass": bool(ok) and not why_na,
                "status": "n/a" if why_na else "PASS" if ok else "MISS",
                "why_na": why_na,
            }
        )

    syn = results.get("synthetic")
    if syn:
        for c, fig in syn["streaming"].items():
            for g, r in fig["ratio"].items():
                add("synthetic", f"tokens/s {g}/direct at {c} stream(s)", r["median"], ">=", 0.90, "x")
        for g in ("ollama", "openai"):
            add(
                "synthetic",
                f"added latency p50, {g}, concurrency 1",
                syn["latency"]["added_p50_ms"][g]["median"],
                "<",
                0.8,
                "ms",
            )
            add(
                "synthetic",
                f"added latency p99, {g}, concurrency 1",
                syn["latency"]["added_p99_ms"][g]["median"],
                "<",
                2.0,
                "ms",
                p99_na(syn["latency"]),
            )
        for g in ("ollama", "openai"):
            add(
                "synthetic",
                f"requests/s {g}/direct at concurrency {syn['rps']['concurrency']}",
                syn["rps"]["ratio"][g]["median"],
                ">=",
                0.30,
                "x",
            )
        add(
            "synthetic", "idle RSS of all our processes", syn["idle_rss"]["total_ours_rss_mb"], "<", 200, "MB"
        )
    real = results.get("real")
    if real:
        for c, fig in real["streaming"].items():
            for g, r in fig["ratio"].items():
                add("real", f"tokens/s {g}/direct at {c} stream(s)", r["median"], ">=", 0.98, "x")
        for g in ("ollama", "openai"):
            add(
                "real",
                f"TTFT p50 {g} minus direct (warm)",
                real["ttft"]["added_p50_ms"][g]["median"],
                "<",
                5.0,
                "ms",
            )
    return out


P99_MIN_SAMPLES = 100  # fewer requests a run: the "p99" is one of the slowest few, a difference of two maxima


def p99_na(fig: dict[str, Any]) -> str:
    n = fig.get("samples_per_run", 0)
    return f"p99 of {n} requests a run: needs {P99_MIN_SAMPLES}" if n < P99_MIN_SAMPLES else ""


def status(t: dict[str, Any]) -> str:
    return str(t.get("status") or ("PASS" if t["pass"] else "MISS"))  # (a baseline from an older bench: no status)


# ---------------------------------------------------------------------- markdown
def _f(v: float, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def _s(stat: dict[str, float], digits: int = 2) -> str:
    """median (min–max)"""
    if not stat or not stat.get("n"):
        return "–"
    if stat["n"] == 1:
        return _f(stat["median"], digits)
    return f"{_f(stat['median'], digits)} ({_f(stat['min'], digits)}–{_f(stat['max'], digits)})"


def _signed(stat: dict[str, float], digits: int = 2) -> str:
    """median (min–max) of a difference, each with its sign: +0.91 (+0.78 to +1.08)"""
    if not stat or not stat.get("n"):
        return "–"

    def one(v: float) -> str:
        return ("+" if v >= 0 else "−") + _f(abs(v), digits)

    if stat["n"] == 1:
        return one(stat["median"])
    return f"{one(stat['median'])} ({one(stat['min'])} to {one(stat['max'])})"


def _got(fig: dict[str, Any]) -> str:
    """`` (streams carried N on average)`` when the streams ended before the tokens asked for."""
    got = fig.get("tokens_per_stream_got")
    return f" (streams carried {got:.1f} on average)" if got and got < 0.95 * fig["tokens_per_stream"] else ""


def _upstream_table(name: str, r: dict[str, Any]) -> list[str]:
    up = r["upstream"]
    lines = [f"### Upstream: {name}", ""]
    if name == "synthetic":
        lines.append(
            "`tools/synthetic_upstream.py`: llama-server's SSE as fast as one Python process can write it "
            "(one write per token, streams interleaved token by token); isolates the proxy's own cost."
        )
    else:
        lines.append(
            f"The real `llama-server` (`-t {up['threads']} -c {up['ctx_size'] * up['parallel']} "
            f"-np {up['parallel']}`) with `{Path(up['model_path']).name}`."
        )
    lines += [
        "",
        "Direct = the very llama-server process the worker runs, on its own TCP port (as a client reaches it). "
        "Unix = the same over the unix socket the worker speaks to it on: a reference, not a target (what of a "
        "ratio is the transport). One-hop = a plain aiohttp reverse proxy (`tools/one_hop_proxy.py`) in front of "
        "direct: a reference, the design guide's calibration (it measured ~0.33 ms added p50 for such a proxy, "
        f"~0.66 ms for this two-hop design done well). Each cell: median (min–max) over {r['params']['runs']} runs; "
        "ratios are per run (gateway run / direct run of the same round).",
        "",
        *([f"**{errors(r)} streams/requests failed** in the loops ({failed_paths(r)}): counted, left out of the "
           "figures.", ""]
          if errors(r) else []),
        "| Figure | direct | unix (reference) | one-hop (reference) | Ollama /api/chat | OpenAI /v1/chat/completions "
        "| Ollama / direct | OpenAI / direct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, fig in r["streaming"].items():
        tps = fig["tokens_per_s"]
        lines.append(
            f"| streaming tokens/s, {c} stream(s) × {fig['tokens_per_stream']} tokens{_got(fig)} | "
            f"{_s(tps['direct'])} | {_s(tps.get(REFERENCE, {}))} | {_s(tps.get(ONE_HOP, {}))} | {_s(tps['ollama'])} | "
            f"{_s(tps['openai'])} | {_s(fig['ratio']['ollama'])} | {_s(fig['ratio']['openai'])} |"
        )
    for c, fig in r["streaming"].items():
        if "ratio_to_reference" in fig:
            ref = fig["ratio_to_reference"]
            lines.append(f"| streaming tokens/s, {c} stream(s), gateway / unix reference | – | – | – | – | – | "
                         f"{_s(ref['ollama'])} | {_s(ref['openai'])} |")
    for key, label in (("ttft", "TTFT, warm"), ("latency", "tiny non-streaming request latency"),
                       ("latency_back_to_back", "tiny request latency, back to back (not a target)")):
        if key not in r:  # (results of an older bench)
            continue
        fig = r[key]
        for p in ("p50", "p99"):
            vals = fig[f"{p}_ms"]
            added = fig[f"added_{p}_ms"]
            lines.append(
                f"| {label} {p} ms ({fig['samples_per_run']}/run) | {_s(vals['direct'])} | "
                f"{_s(vals.get(REFERENCE, {}))} | {_s(vals.get(ONE_HOP, {}))} | {_s(vals['ollama'])} | "
                f"{_s(vals['openai'])} | {_signed(added['ollama'])} ms | {_signed(added['openai'])} ms |"
            )
    rps = r["rps"]
    lines.append(
        f"| requests/s, concurrency {rps['concurrency']} | {_s(rps['requests_per_s']['direct'])} | "
        f"{_s(rps['requests_per_s'].get(REFERENCE, {}))} | {_s(rps['requests_per_s'].get(ONE_HOP, {}))} | "
        f"{_s(rps['requests_per_s']['ollama'])} | "
        f"{_s(rps['requests_per_s']['openai'])} | "
        f"{_s(rps['ratio']['ollama'])} | {_s(rps['ratio']['openai'])} |"
    )
    cold = r["cold_start"]
    lines.append(
        f"| cold start: request → first token ms ({cold['runs']} runs; direct: spawn → first token, "
        f"spawn → healthy {_s(cold['direct_load_ms'], 0)}) | {_s(cold['direct_first_token_ms'], 0)} | – | – | "
        f"{_s(cold['first_token_ms']['ollama'], 0)} | {_s(cold['first_token_ms']['openai'], 0)} | "
        f"{_s(cold['ratio_to_direct_first_token']['ollama'])} | "
        f"{_s(cold['ratio_to_direct_first_token']['openai'])} |"
    )
    floor = r.get("bus_floor")
    if floor:
        rtt = floor["rtt_p50_us"]
        lines += [
            "",
            f"Bus floor (`tools/bench/floor.py`): one round trip between two processes, {floor['pause_ms']:g} ms "
            f"apart, p50 over {floor['samples_per_run']} a run: through pyzmq (DEALER → ROUTER over ipc, as a "
            f"gateway and a worker) {_s(rtt['zmq'], 0)} µs, over a plain unix socket {_s(rtt['unix'], 0)} µs. "
            "A request crosses the bus once each way: "
            f"{_s(floor['zmq_minus_unix_us'], 0)} µs of a gateway's added latency are ZeroMQ's transport itself "
            "(libzmq's I/O threads: three thread wakeups a hop where a socket has one), whatever our code does.",
        ]
    lines += [
        "",
        "CPU µs per token (psutil user+system time of each process / tokens streamed), median over runs "
        "(the kernel counts CPU time in clock ticks, 10 ms here: a short loop's figures come in steps):",
        "",
        "| Streams | path | gateway | worker | upstream | client |",
        "|---|---|---|---|---|---|",
    ]
    for c, fig in r["streaming"].items():
        for path in ("direct", REFERENCE, ONE_HOP, "ollama", "openai"):
            if path not in fig["cpu_us_per_token"]:
                continue
            cpu = fig["cpu_us_per_token"][path]
            cells = [
                _f(cpu[k]["median"], 1) if k in cpu else "–"
                for k in ("gateway", "worker", "upstream", "client")
            ]
            lines.append(f"| {c} | {path} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Idle RSS (MB; after warm-up, before the load; and after the load):",
        "",
        "| Process | RSS idle | USS idle | RSS after load |",
        "|---|---|---|---|",
    ]
    idle, after = r["idle_rss"], r["rss_after_load"]
    for role in idle["rss_mb"]:
        lines.append(
            f"| {role} | {_f(idle['rss_mb'][role], 1)} | {_f(idle['uss_mb'][role], 1)} | "
            f"{_f(after['rss_mb'][role], 1)} |"
        )
    lines.append(
        f"| **ours together** (all but the upstream) | **{_f(idle['total_ours_rss_mb'], 1)}** | "
        f"{_f(idle['total_ours_uss_mb'], 1)} | {_f(after['total_ours_rss_mb'], 1)} |"
    )
    return lines


def markdown(doc: dict[str, Any], before: dict[str, Any] | None = None, notes: str = "") -> str:
    m = doc["machine"]
    lines = [
        "# Benchmarks: what the proxy costs against direct llama-server",
        "",
        f"Generated by `{doc['command']}` on {doc['date']} (commit {m['git_commit']}).",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['physical_cores']} physical), "
        f"{m['ram_gb']} GB RAM, {m['os']}, kernel {m['kernel']}, Python {m['python']}. "
        f"Load average (1/5/15 min) before the run: {doc['load_before']}, after: {doc['load_after']}. "
        f"On {m['logical_cores']} logical cores the load client, the upstream, the gateway and the worker all "
        "compete for them: ratios include that contention, and anything else running moves the figures.",
        "",
    ]
    if notes:
        lines += [notes, ""]
    lines += ["## Targets", "", "| Upstream | Target | Value | Limit | Result |", "|---|---|---|---|---|"]
    for t in doc["targets"]:
        lines.append(
            f"| {t['upstream']} | {t['target']} | {_f(t['value'])} {t['unit']} | {t['op']} {_f(t['limit'])} "
            f"{t['unit']} | {_md_status(t)} |"
        )
    lines += ["", "## Figures", ""]
    for name in ("synthetic", "real"):
        if name in doc["results"]:
            lines += _upstream_table(name, doc["results"][name]) + [""]
        elif name in doc.get("skipped", {}):
            lines += [f"### Upstream: {name}", "", f"Skipped: {doc['skipped'][name]}", ""]
    if before:
        lines += before_after(before, doc)
    return "\n".join(lines).rstrip() + "\n"


def _md_status(t: dict[str, Any]) -> str:
    st = status(t)
    return "**MISS**" if st == "MISS" else f"n/a: {t['why_na']}" if st == "n/a" else st


def _before_after_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(upstream, target, before, after, limit) for each target of this run, beside a previous run's."""
    old = {(t["upstream"], t["target"]): t for t in before.get("targets", [])}
    rows = []
    for t in after["targets"]:
        b = old.get((t["upstream"], t["target"]))
        bv = f"{_f(b['value'])} {t['unit']} {status(b)}" if b else "–"
        rows.append((t["upstream"], t["target"], bv, f"{_f(t['value'])} {t['unit']} {status(t)}",
                     f"{t['op']} {_f(t['limit'])}"))
    return rows


def before_after(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The targets of a previous run (``--baseline``) next to this run's."""
    lines = [
        "## Before / after",
        "",
        f"Before: {before.get('label') or 'baseline'} (commit "
        f"{before['machine'].get('git_commit', '?')}, {before.get('date', '?')}, load {before.get('load_before')}); "
        f"after: {after.get('label') or 'this run'} (load {after.get('load_before')}).",
        "",
        "| Upstream | Target | Before | After | Limit |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _before_after_rows(before, after)]
    return lines + [""]


def errors(r: dict[str, Any]) -> int:
    """Streams and requests of an upstream's loops that failed (tolerated, counted)."""
    return sum(int(fig.get("errors", 0)) for fig in r["streaming"].values()) + int(r["rps"].get("errors", 0))


def failed_paths(r: dict[str, Any]) -> str:
    """Which paths the failures were on: ``direct 9, ollama 1`` (one stream at a time: not told apart)."""
    by: dict[str, int] = {}
    for fig in [*r["streaming"].values(), r["rps"]]:
        for path, n in (fig.get("errors_by_path") or {}).items():
            by[path] = by.get(path, 0) + n
    told = sum(by.values())
    parts = [f"{path} {n}" for path, n in sorted(by.items())]
    if told < errors(r):
        parts.append(f"one stream at a time {errors(r) - told}")
    return ", ".join(parts)


def console(doc: dict[str, Any], before: dict[str, Any] | None = None, quick: bool = False) -> str:
    """The ratios, the process figures and the targets, for the terminal."""
    lines = []
    for name, r in doc["results"].items():
        lines.append(f"== {name} upstream: ratios gateway/direct and differences gateway - direct: "
                     "median (min to max) over runs ==")
        for c, fig in r["streaming"].items():
            lines.append(
                f"  tokens/s {c:>2} streams   ollama {_s(fig['ratio']['ollama'])}   "
                f"openai {_s(fig['ratio']['openai'])}{_got(fig)}"
            )
        for key, label in (("ttft", "TTFT"), ("latency", "latency"), ("latency_back_to_back", "latency b2b")):
            for p in ("p50", "p99"):
                if key not in r:
                    continue
                a = r[key][f"added_{p}_ms"]
                lines.append(f"  {label} {p} added ms    ollama {_signed(a['ollama'])}   "
                             f"openai {_signed(a['openai'])}   ({r[key]['samples_per_run']} requests a run)")
        b2b = r.get("latency_back_to_back", {}).get("added_p50_ms", {})
        if ONE_HOP in b2b:
            lines.append(f"  reference: a plain one-hop aiohttp proxy adds {_signed(b2b[ONE_HOP])} ms p50 back to back "
                         "(the design guide: ~0.33 ms); tokens/s one-hop / direct: " + ", ".join(
                             f"{c} streams {_s(fig['one_hop_ratio'])}" for c, fig in r["streaming"].items()
                             if "one_hop_ratio" in fig))
        if all("reference_ratio" in fig for fig in r["streaming"].values()):
            lines.append("  reference: tokens/s over llama-server's unix socket / over its TCP port: " + ", ".join(
                f"{c} streams {_s(fig['reference_ratio'])}" for c, fig in r["streaming"].items()))
        if all("ratio_to_reference" in fig for fig in r["streaming"].values()):
            lines.append("  reference: tokens/s gateway / llama-server's unix socket: " + ", ".join(
                f"{c} streams ollama {_s(fig['ratio_to_reference']['ollama'])} openai "
                f"{_s(fig['ratio_to_reference']['openai'])}" for c, fig in r["streaming"].items()))
        if "bus_floor" in r:
            fl = r["bus_floor"]
            lines.append(f"  bus floor: round trip p50 µs through pyzmq {_s(fl['rtt_p50_us']['zmq'], 0)}, over a unix "
                         f"socket {_s(fl['rtt_p50_us']['unix'], 0)}: zmq adds {_s(fl['zmq_minus_unix_us'], 0)} µs "
                         "a request")
        rr = r["rps"]["ratio"]
        lines.append(
            f"  requests/s c={r['rps']['concurrency']}   ollama {_s(rr['ollama'])}   openai {_s(rr['openai'])}"
        )
        cs = r["cold_start"]
        lines.append(
            f"  cold start ms: llama-server first token {_s(cs['direct_first_token_ms'], 0)}, "
            f"ollama {_s(cs['first_token_ms']['ollama'], 0)}, openai {_s(cs['first_token_ms']['openai'], 0)}"
        )
        for c, fig in r["streaming"].items():
            cpu = fig["cpu_us_per_token"]
            parts = [f"{g}: gateway {_f(cpu[g]['gateway']['median'], 1)}, worker {_f(cpu[g]['worker']['median'], 1)}"
                     for g in GATEWAY_PATHS if g in cpu and {"gateway", "worker"} <= cpu[g].keys()]
            if parts:
                lines.append(f"  CPU µs per token at {c} stream{'s' if c != '1' else ''}: " + "; ".join(parts))
        idle = r["idle_rss"]
        lines.append("  idle RSS MB: " + ", ".join(f"{role} {_f(v, 1)}" for role, v in idle["rss_mb"].items())
                     + f"; ours together {_f(idle['total_ours_rss_mb'], 1)}")
        failed = errors(r)
        if failed:
            lines.append(f"  {failed} streams/requests failed in the loops ({failed_paths(r)}): counted, left out of "
                         "the figures")
    lines.append("== targets ==")
    for t in doc["targets"]:
        why = f" ({t['why_na']})" if status(t) == "n/a" else ""
        lines.append(
            f"  {status(t):4}  [{t['upstream']}] {t['target']}: {_f(t['value'])} "
            f"{t['unit']} ({t['op']} {_f(t['limit'])}){why}"
        )
    if quick:
        lines.append("  (--quick: few runs and requests, so PASS/MISS only hint; the full run is what counts)")
    if before:
        lines.append("== before / after ==")
        for upstream, target, was, now, limit in _before_after_rows(before, doc):
            lines.append(f"  [{upstream}] {target}: {was} -> {now} ({limit})")
    return "\n".join(lines)
