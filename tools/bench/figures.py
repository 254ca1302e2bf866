"""Every figure of one upstream, measured side by side: direct (the worker's own llama-server) and each gateway."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bus import endpoints
from tools.bench import load
from tools.bench.instance import ROOT, BenchError, Instance, Upstream, free_port, start_instance
from workers.llama_server import LISTENING

GATEWAYS = ("ollama", "openai")
# llama-server over the unix socket the worker speaks to it on: a reference beside direct (its TCP port, as a client
# reaches it), not a target; it shows how much of a ratio is the transport rather than the proxy.
REFERENCE = "direct-unix"
# A plain one-hop aiohttp proxy (tools/one_hop_proxy.py) in front of the same llama-server's TCP port: the calibration
# of the design guide ("a plain one-hop aiohttp proxy adds ~0.33 ms p50 per request"), measured on this machine.
ONE_HOP = "one-hop-proxy"
ONE_HOP_PROXY = ROOT / "tools" / "one_hop_proxy.py"
OUR_PROCESSES = ("supervisor", "gateway-ollama", "gateway-openai", "dashboard", "worker")


@dataclass
class Params:
    runs: int = 5
    concurrency: tuple[int, ...] = (1, 16, 64)
    tokens: dict[int, int] = field(
        default_factory=lambda: {1: 512, 16: 512, 64: 512}
    )  # per stream, by concurrency
    duration: float = 1.5  # seconds of each streaming loop (at least one stream per loop)
    samples: int = 100  # sequential requests per target per run (latency, TTFT)
    ttft_tokens: int = 4
    rps_concurrency: int = 32
    rps_duration: float = 2.0
    cold_runs: int = 3
    idle_wait: float = 3.0
    reference: bool = True  # measure the references too: REFERENCE (where the worker has a unix socket), ONE_HOP


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summary(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v == v]  # no nan
    if not vals:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan"), "n": 0}
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


def ratios(num: list[float], den: list[float]) -> dict[str, float]:
    return summary([a / b for a, b in zip(num, den, strict=True) if b])


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for role, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[role] = t.user + t.system
        except psutil.Error:
            pass
    return out


@dataclass
class _Tally:
    """What one target's streams of a run came to."""

    tokens: int = 0
    wall: float = 0.0  # seconds
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds used meanwhile, by process role
    streams: int = 0

    def add(self, tokens: int, wall: float, cpu: dict[str, float], streams: int = 1) -> None:
        self.tokens += tokens
        self.wall += wall
        self.streams += streams
        for role, seconds in cpu.items():
            self.cpu[role] = self.cpu.get(role, 0.0) + seconds


def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds used between two ``cpu_seconds`` readings, by role (of the processes in both)."""
    return {role: after[role] - before[role] for role in after if role in before}


def in_turn(targets: dict[str, load.Target], run: int) -> list[tuple[str, load.Target]]:
    """The targets in order on even runs, in reverse on odd ones: whatever a run's order favours (the machine
    settling, a backend's state left by the target before) favours every target alike over the runs."""
    items = list(targets.items())
    return items if run % 2 == 0 else items[::-1]


class Bench:
    def __init__(self, inst: Instance, s: aiohttp.ClientSession, p: Params) -> None:
        self.inst, self.s, self.p = inst, s, p
        self.name = inst.upstream.kind
        self.t: dict[str, load.Target] = {}  # direct and the gateways
        self.ref: dict[str, load.Target] = {}  # the references (REFERENCE, ONE_HOP), where measured
        self.unix_session: aiohttp.ClientSession | None = None
        self.one_hop: subprocess.Popen[str] | None = None

    def connect(self) -> None:
        pids = self.inst.refresh_pids()
        key = self.inst.upstream_key()
        self.t = load.targets(
            self.inst.upstream_port(),
            self.inst.ports["ollama"],
            self.inst.ports["openai"],
            self.inst.upstream.model,
            key,
        )
        self.cpu_pids = {
            "gateway-ollama": pids["gateway-ollama"],
            "gateway-openai": pids["gateway-openai"],
            "worker": pids["worker"],
            "upstream": pids["upstream"],
            "client": psutil.Process().pid,
        }
        path = endpoints.llama_socket(self.inst.run_dir, self.inst.upstream.model)
        if self.p.reference and path and Path(path).is_socket():
            self.unix_session = self.unix_session or load.session(path)
            self.ref = {REFERENCE: load.Target(REFERENCE, "http://localhost/v1/chat/completions",
                                               self.inst.upstream.model, session=self.unix_session, key=key)}
        if self.p.reference:
            port = self.start_one_hop(self.inst.upstream_port())
            self.ref[ONE_HOP] = load.Target(ONE_HOP, f"http://127.0.0.1:{port}/v1/chat/completions",
                                            self.inst.upstream.model, key=key)
            assert self.one_hop is not None
            self.cpu_pids["gateway-" + ONE_HOP] = self.one_hop.pid

    def start_one_hop(self, upstream_port: int) -> int:
        """(Re)start the one-hop proxy in front of the llama-server on ``upstream_port``; its port."""
        self.stop_one_hop()
        port = free_port()
        self.one_hop = subprocess.Popen([sys.executable, str(ONE_HOP_PROXY), f"http://127.0.0.1:{upstream_port}",
                                         str(port)], stdout=subprocess.PIPE, text=True)
        assert self.one_hop.stdout is not None
        if "listening" not in self.one_hop.stdout.readline():
            raise BenchError(f"the one-hop proxy did not start (exit code {self.one_hop.poll()})")
        return port

    def stop_one_hop(self) -> None:
        if self.one_hop is not None:
            self.one_hop.terminate()
            self.one_hop.wait(10)
            self.one_hop = None

    @property
    def every(self) -> dict[str, load.Target]:
        """Direct, the gateways, and the reference where there is one."""
        return {**self.t, **self.ref}

    async def run(self) -> dict[str, Any]:
        """Every figure, in order."""
        await self.warm()
        p = self.p
        result: dict[str, Any] = {
            "upstream": asdict(self.inst.upstream),
            "params": {**asdict(p), "tokens": {str(k): v for k, v in p.tokens.items()}},
        }
        result["idle_rss"] = self.idle_rss()
        result["latency"] = await self.latency(stream=False)
        result["latency_back_to_back"] = await self.latency(stream=False, back_to_back=True)
        result["ttft"] = await self.latency(stream=True)
        result["streaming"] = await self.streaming()
        result["rps"] = await self.rps()
        result["cold_start"] = await self.cold_start()
        result["rss_after_load"] = self.idle_rss()
        return result

    async def close(self) -> None:
        self.stop_one_hop()
        if self.unix_session is not None:
            await self.unix_session.close()

    async def warm(self) -> None:
        gw = load.Target("openai", self.inst.url("openai") + "/v1/chat/completions", self.inst.upstream.model)
        await load.request_once(self.s, gw, gw.body(1, False))  # loads the model
        self.connect()
        for t in self.every.values():
            for _ in range(3):
                await load.request_once(self.s, t, t.body(2, False))
                await load.stream_once(self.s, t, t.body(8, True))

    # ------------------------------------------------------------------ figures
    def idle_rss(self) -> dict[str, Any]:
        time.sleep(self.p.idle_wait)
        pids = self.inst.refresh_pids()
        rss, uss = {}, {}
        for role in (*OUR_PROCESSES, "upstream"):
            try:
                proc = psutil.Process(pids[role])
                info = proc.memory_full_info()
                rss[role], uss[role] = info.rss / 2**20, info.uss / 2**20
            except (KeyError, psutil.Error):
                rss[role] = uss[role] = float("nan")
        total = sum(rss[r] for r in OUR_PROCESSES)
        say(
            f"[{self.name}] idle RSS MB: "
            + ", ".join(f"{k} {v:.1f}" for k, v in rss.items())
            + f"; ours {total:.1f}"
        )
        return {
            "rss_mb": rss,
            "uss_mb": uss,
            "total_ours_rss_mb": total,
            "total_ours_uss_mb": sum(uss[r] for r in OUR_PROCESSES),
        }

    async def streaming(self) -> dict[str, Any]:
        """Tokens/s of every target at each concurrency. One stream at a time goes to the targets in turn, stream by
        stream (d, o, a, a, o, d, ...: the machine's drift within a run, seconds long, hits them alike); more
        concurrent streams go to one target at a time, for ``duration`` each."""
        out: dict[str, Any] = {}
        for c in self.p.concurrency:
            every = self.every
            tps: dict[str, list[float]] = {n: [] for n in every}
            cpu: dict[str, dict[str, list[float]]] = {n: {} for n in every}
            got = [0, 0]  # tokens and streams of every target and run (a stream ending early shows here)
            errors = 0
            failed_by: dict[str, int] = {}  # streams that failed, by path (llama-server itself drops some at 64)
            for r in range(self.p.runs):
                if c == 1:
                    tallies, failed = await self.one_stream_in_turn(every, r)
                    errors += failed
                else:
                    tallies = {}
                    for name, t in in_turn(every, r):
                        before = cpu_seconds(self.cpu_pids)
                        res = await load.stream_throughput(self.s, t, c, self.p.tokens[c], self.p.duration)
                        tallies[name] = _Tally(res.tokens, res.wall, used(before, cpu_seconds(self.cpu_pids)),
                                               res.streams)
                        errors += res.errors
                        if res.errors:
                            failed_by[name] = failed_by.get(name, 0) + res.errors
                for name, tally in tallies.items():
                    tps[name].append(tally.tokens / tally.wall if tally.wall > 0 else 0.0)
                    got[0] += tally.tokens
                    got[1] += tally.streams
                    for role in ("gateway-" + name, "worker", "upstream", "client"):
                        if name in ("direct", REFERENCE, ONE_HOP) and role == "worker":
                            continue
                        if role in tally.cpu and tally.tokens:
                            cpu[name].setdefault(role.split("-")[0], []).append(
                                tally.cpu[role] / tally.tokens * 1e6)
                say(
                    f"[{self.name}] tokens/s c={c} run {r + 1}/{self.p.runs}: "
                    + ", ".join(f"{n} {v[-1]:.0f}" for n, v in tps.items())
                )
            out[str(c)] = {
                "tokens_per_stream": self.p.tokens[c],
                "tokens_per_stream_got": got[0] / got[1] if got[1] else 0.0,
                "tokens_per_s": {n: summary(v) for n, v in tps.items()},
                "tokens_per_s_runs": tps,
                "ratio": {g: ratios(tps[g], tps["direct"]) for g in GATEWAYS},
                **({"reference_ratio": ratios(tps[REFERENCE], tps["direct"]),
                    "ratio_to_reference": {g: ratios(tps[g], tps[REFERENCE]) for g in GATEWAYS}}
                   if REFERENCE in tps else {}),
                **({"one_hop_ratio": ratios(tps[ONE_HOP], tps["direct"])} if ONE_HOP in tps else {}),
                "cpu_us_per_token": {
                    n: {role: summary(v) for role, v in roles.items()} for n, roles in cpu.items()
                },
                "errors": errors,
                "errors_by_path": failed_by,
            }
        return out

    async def one_stream_in_turn(self, every: dict[str, load.Target], run: int) -> tuple[dict[str, _Tally], int]:
        """One stream at a time, the targets in turn, for ``duration`` per target in all (each at least once): per
        target its tokens, the time its streams took and the CPU seconds its processes used meanwhile; and the
        number of streams that failed (more than 20: raised, as ``load.stream_throughput`` does)."""
        bodies = {n: t.body(self.p.tokens[1], True) for n, t in every.items()}
        tallies = {n: _Tally() for n in every}
        deadline = time.perf_counter() + self.p.duration * len(every)
        turn, failed = run, 0
        while True:
            for name, t in in_turn(every, turn):
                before = cpu_seconds(self.cpu_pids)
                try:
                    res = await load.stream_once(self.s, t, bodies[name])
                except (load.LoadError, aiohttp.ClientError):
                    failed += 1
                    if failed > 20:
                        raise
                    continue
                tallies[name].add(res.tokens, res.elapsed, used(before, cpu_seconds(self.cpu_pids)))
            turn += 1
            if time.perf_counter() >= deadline:
                return tallies, failed

    async def latency(self, stream: bool, back_to_back: bool = False) -> dict[str, Any]:
        """Non-streaming tiny request latency (stream=False) or warm TTFT (stream=True), ms: the targets
        interleaved request by request, or (``back_to_back``, non-streaming) in blocks of requests to one target."""
        # (interleaved: the reference stays out, one more target between two requests of a path would change it)
        every = self.every if back_to_back else self.t
        others = [n for n in every if n != "direct"]
        p50: dict[str, list[float]] = {n: [] for n in every}
        p99: dict[str, list[float]] = {n: [] for n in every}
        tokens = self.p.ttft_tokens if stream else 1
        measured = 0  # requests a run per path (back to back: whole blocks)
        for r in range(self.p.runs):
            targets = list(every.values())
            lat = (await load.latencies_back_to_back(self.s, targets, self.p.samples) if back_to_back else
                   await load.latencies(self.s, targets, self.p.samples, tokens, stream))
            measured = len(lat["direct"])
            for n, v in lat.items():
                p50[n].append(load.percentile(v, 50) * 1000)
                p99[n].append(load.percentile(v, 99) * 1000)
            what = "TTFT" if stream else "latency back to back" if back_to_back else "latency"
            say(
                f"[{self.name}] {what} run {r + 1}/{self.p.runs} p50/p99 ms: "
                + ", ".join(f"{n} {p50[n][-1]:.2f}/{p99[n][-1]:.2f}" for n in every)
            )
        return {
            "samples_per_run": measured,
            "p50_ms": {n: summary(v) for n, v in p50.items()},
            "p99_ms": {n: summary(v) for n, v in p99.items()},
            # (the gateways', and the references' where measured)
            "added_p50_ms": {g: summary([a - b for a, b in zip(p50[g], p50["direct"], strict=True)]) for g in others},
            "added_p99_ms": {g: summary([a - b for a, b in zip(p99[g], p99["direct"], strict=True)]) for g in others},
            "ratio_p50": {g: ratios(p50[g], p50["direct"]) for g in others},
        }

    async def rps(self) -> dict[str, Any]:
        every = self.every
        vals: dict[str, list[float]] = {n: [] for n in every}
        errors = 0
        failed_by: dict[str, int] = {}
        for r in range(self.p.runs):
            for name, t in in_turn(every, r):
                rate, _done, err = await load.requests_per_s(
                    self.s, t, self.p.rps_concurrency, self.p.rps_duration
                )
                vals[name].append(rate)
                errors += err
                if err:
                    failed_by[name] = failed_by.get(name, 0) + err
            say(
                f"[{self.name}] requests/s c={self.p.rps_concurrency} run {r + 1}/{self.p.runs}: "
                + ", ".join(f"{n} {v[-1]:.0f}" for n, v in vals.items())
            )
        return {
            "concurrency": self.p.rps_concurrency,
            "requests_per_s": {n: summary(v) for n, v in vals.items()},
            "ratio": {g: ratios(vals[g], vals["direct"]) for g in every if g != "direct"},
            "errors": errors,
            "errors_by_path": failed_by,
        }

    async def cold_start(self) -> dict[str, Any]:
        """Request -> first token with the model not loaded, against llama-server's own start (spawn -> healthy,
        and spawn -> first token) with the same argv."""
        direct_load, direct_first = [], []
        via: dict[str, list[float]] = {g: [] for g in GATEWAYS}
        for r in range(self.p.cold_runs):
            load_s, first_s = await direct_start(self.s, self.inst.upstream)
            direct_load.append(load_s)
            direct_first.append(first_s)
            for g in GATEWAYS:
                self.inst.stop_worker()
                t = load.Target(
                    g,
                    self.inst.url(g) + ("/api/chat" if g == "ollama" else "/v1/chat/completions"),
                    self.inst.upstream.model,
                )
                res = await load.stream_once(self.s, t, t.body(self.p.ttft_tokens, True))
                via[g].append(res.ttft)
            say(
                f"[{self.name}] cold start run {r + 1}/{self.p.cold_runs}: llama-server load {load_s * 1000:.0f} ms, "
                f"first token {first_s * 1000:.0f} ms; "
                + ", ".join(f"{g} {v[-1] * 1000:.0f} ms" for g, v in via.items())
            )
        self.connect()
        ms = {g: summary([v * 1000 for v in vals]) for g, vals in via.items()}
        return {
            "runs": self.p.cold_runs,
            "direct_load_ms": summary([v * 1000 for v in direct_load]),
            "direct_first_token_ms": summary([v * 1000 for v in direct_first]),
            "first_token_ms": ms,
            "ratio_to_direct_first_token": {g: ratios(via[g], direct_first) for g in GATEWAYS},
            "added_ms": {
                g: summary([(a - b) * 1000 for a, b in zip(via[g], direct_first, strict=True)])
                for g in GATEWAYS
            },
        }


async def direct_start(s: aiohttp.ClientSession, upstream: Upstream) -> tuple[float, float]:
    """Start the upstream by hand as the worker would: (spawn -> /health 200, spawn -> first streamed token)."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *upstream.argv(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    drain: asyncio.Task[bytes] | None = None
    try:
        port = 0
        while not port:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line:
                raise load.LoadError(f"{upstream.binary} exited with code {await proc.wait()}")
            m = LISTENING.search(line)
            port = int(m.group(1)) if m else 0
        drain = asyncio.create_task(proc.stdout.read())  # keep the pipe from filling up
        while True:
            try:
                async with s.get(f"http://127.0.0.1:{port}/health") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.005)
        loaded = time.perf_counter() - t0
        t = load.Target("direct", f"http://127.0.0.1:{port}/v1/chat/completions", upstream.model)
        t1 = time.perf_counter()
        res = await load.stream_once(s, t, t.body(4, True))
        first = t1 - t0 + res.ttft
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        if drain is not None:
            drain.cancel()
    return loaded, first


async def run_upstream(upstream: Upstream, p: Params) -> dict[str, Any]:
    say(f"[{upstream.kind}] starting llama-runner with {upstream.binary} ({upstream.model_path})")
    inst = start_instance(upstream)
    try:
        async with load.session() as s:
            b = Bench(inst, s, p)
            try:
                return await b.run()
            finally:
                await b.close()
    except Exception:  # (not an interruption: nothing failed)
        say(inst.logs()[-4000:])
        raise
    finally:
        inst.stop()
