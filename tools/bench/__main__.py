"""``python -m tools.bench``: what llama-runner costs against direct llama-server (issue 7).

Starts a private llama-runner instance per upstream (the synthetic upstream, then the real llama-server with
the default model), measures every figure side by side (direct, Ollama gateway, OpenAI gateway), prints the
ratios and the targets, and writes BENCHMARKS.md and BENCHMARKS.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.bench import floor, report
from tools.bench.figures import Params, run_upstream, say
from tools.bench.instance import ROOT, real_upstream, synthetic_upstream


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # (nan too)
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="What llama-runner costs against direct llama-server: every figure side by side (direct, "
                    "Ollama gateway, OpenAI gateway), ratios and targets; writes BENCHMARKS.md and BENCHMARKS.json.")
    p.add_argument("--quick", action="store_true", help="fewer runs, shorter loops (~2 minutes; writes nothing "
                                                        "unless --out-dir is given)")
    p.add_argument("--upstream", choices=("both", "synthetic", "real"), default="both",
                   help="the synthetic upstream (the proxy's own cost), the real llama-server with the default "
                        "model, or both (default)")
    p.add_argument("--runs", type=_count, help="runs per figure (min/median/max over them)")
    p.add_argument("--duration", type=_seconds, help="seconds of each streaming loop")
    p.add_argument("--samples", type=_count, help="sequential requests per target per run (latency, TTFT)")
    p.add_argument("--tokens", type=_count, help="tokens per stream on the synthetic upstream")
    p.add_argument("--rps-duration", type=_seconds, help="seconds of each requests/s loop")
    p.add_argument("--cold-runs", type=_count, help="cold starts per gateway")
    p.add_argument("--idle-wait", type=_seconds, help="seconds idle before reading RSS")
    p.add_argument(
        "--out-dir", type=Path,
        help="where BENCHMARKS.md/.json go (default: the repo; a --quick run writes only where this says)",
    )
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--baseline", type=Path, help="a previous BENCHMARKS.json: adds a before/after table")
    p.add_argument("--label", default="", help="a name for this run (shown in before/after tables)")
    p.add_argument("--notes", default="", help="a paragraph added to BENCHMARKS.md")
    return p


def params(args: argparse.Namespace, kind: str) -> Params:
    if kind == "synthetic":
        p = Params(
            runs=5,
            tokens={1: 1024, 16: 256, 64: 128},
            duration=1.5,
            samples=200,
            rps_duration=2.0,
            cold_runs=3,
            idle_wait=3.0,
        )
        if args.quick:
            p = Params(
                runs=3,
                tokens={1: 1024, 16: 256, 64: 128},
                duration=0.6,
                samples=60,
                rps_duration=0.8,
                cold_runs=1,
                idle_wait=1.0,
            )
        if args.tokens:
            p.tokens = {c: args.tokens for c in p.concurrency}
    else:  # the real model: 45-90 tokens/s with -t 1 on these machines; loops long enough for several streams a run
        # (no reference: at these rates the transport is noise, and 6 runs of each target, three in each order,
        # steady the medians more: a round moves ±15%)
        p = Params(
            runs=6,
            tokens={1: 32, 16: 16, 64: 8},
            duration=5.0,
            samples=30,
            ttft_tokens=2,
            rps_duration=2.0,
            cold_runs=3,
            idle_wait=3.0,
            reference=False,
        )
        if args.quick:
            p = Params(
                runs=2,
                tokens={1: 32, 16: 4, 64: 2},
                duration=0.0,
                samples=8,
                ttft_tokens=2,
                rps_duration=1.0,
                cold_runs=1,
                idle_wait=1.0,
                reference=False,
            )
    for name in ("runs", "duration", "samples", "rps_duration", "cold_runs", "idle_wait"):
        value = getattr(args, name)
        if value is not None:
            setattr(p, name, value)
    return p


async def _run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    if args.upstream in ("both", "synthetic"):
        p = params(args, "synthetic")
        results["synthetic"] = await run_upstream(synthetic_upstream(tmp), p)
        results["synthetic"]["bus_floor"] = floor.measure(p.runs, p.samples)
    if args.upstream in ("both", "real"):
        real = real_upstream()
        if real is None:
            skipped["real"] = "llama-server or the default model is missing (run `make setup`)"
            say("[real] skipped: " + skipped["real"])
        else:
            results["real"] = await run_upstream(real, params(args, "real"))
    return {"results": results, "skipped": skipped}


def _baseline(parser: argparse.ArgumentParser, path: Path | None) -> dict[str, Any] | None:
    """The --baseline document, read before the run (a bad one would throw the whole run away at its end)."""
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"--baseline {path}: {exc}")
    if not isinstance(doc, dict) or not isinstance(doc.get("targets"), list) or "machine" not in doc:
        parser.error(f"--baseline {path}: not a BENCHMARKS.json of this tool (no targets)")
    return doc


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the instance and its temporary folders are cleaned up


async def _interruptible(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """``_run``, which a SIGTERM cancels (its instance and upstream are cleaned up on the way out). A
    KeyboardInterrupt raised by a signal handler in the middle of the event loop could be swallowed by a callback:
    the benchmark went on after the signal (1 time in 4)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signalled: list[int] = []

    def stop() -> None:
        signalled.append(1)
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        return await _run(args, tmp)
    except asyncio.CancelledError:
        if signalled:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    before = _baseline(parser, args.baseline)
    if args.out_dir is not None and args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"--out-dir {args.out_dir}: not a folder")
    if args.upstream == "real" and real_upstream() is None:
        say("no real upstream: llama-server or the default model is missing (run `make setup`)")
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    load_before = report.load_average()
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="lr-bench-up-") as tmp:
            try:
                import uvloop

                out = uvloop.run(_interruptible(args, Path(tmp)))
            except ImportError:
                out = asyncio.run(_interruptible(args, Path(tmp)))
    except KeyboardInterrupt:
        say("interrupted: the benchmark's processes and temporary folders are cleaned up; nothing written")
        return 130
    doc: dict[str, Any] = {
        "command": "python -m tools.bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "label": args.label,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(time.monotonic() - t0, 1),
        "machine": report.machine(),
        "load_before": load_before,
        "load_after": report.load_average(),
        **out,
    }
    doc["targets"] = report.targets(doc["results"])
    print(report.console(doc, before, quick=args.quick))
    say(f"done in {doc['seconds']} s")
    if args.quick and args.out_dir is None and not args.no_write:  # (the repo's files are full runs)
        say("quick run: BENCHMARKS.md/.json not written (give --out-dir to keep them)")
    elif not args.no_write:
        args.out_dir = args.out_dir or ROOT
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "BENCHMARKS.json").write_text(json.dumps(no_nan(doc), indent=1) + "\n")
        (args.out_dir / "BENCHMARKS.md").write_text(report.markdown(doc, before, args.notes))
        say(f"wrote {args.out_dir / 'BENCHMARKS.md'} and BENCHMARKS.json")
    return 0


def no_nan(value: Any) -> Any:
    """``value`` with every NaN (a figure not measured) as null: strict JSON readers refuse NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
