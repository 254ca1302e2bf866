"""Start a worker: ``python -m workers '<WorkerLaunch JSON>'`` (the supervisor does this)."""

from __future__ import annotations

import sys

import msgspec

from bus.protocol import WorkerLaunch
from supervisor.child import run, set_parent_death_signal
from supervisor.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m workers '<WorkerLaunch JSON>'", file=sys.stderr)
        return 2
    launch = msgspec.json.decode(args[0], type=WorkerLaunch)
    set_parent_death_signal()
    setup_logging(f"worker-{launch.name}", launch.logs_dir)
    if launch.kind == "llama":
        from workers.service import LlamaWorker

        return run(LlamaWorker(launch, launch.load_timeout_s).run)
    if launch.kind == "whisper":
        from workers.whisper_worker import WhisperWorker  # type: ignore[import-not-found]

        return run(WhisperWorker(launch).run)
    print(f"unknown worker kind {launch.kind!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
