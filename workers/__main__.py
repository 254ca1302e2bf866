"""Start a worker: ``python -m workers '<WorkerLaunch JSON>'`` (the supervisor does this)."""

from __future__ import annotations

import sys

from supervisor.lean import refuse_probed_imports

refuse_probed_imports()  # before anything imports structlog

from bus.protocol import WorkerLaunch  # noqa: E402
from supervisor.child import read_launch, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    launch = read_launch("workers", WorkerLaunch, argv, lambda w: f"worker-{w.name}")
    if launch is None:
        return 2
    if launch.kind == "llama":
        from workers.service import LlamaWorker

        return run(LlamaWorker(launch, launch.load_timeout_s).run)
    if launch.kind == "whisper":
        from workers.whisper_worker import WhisperWorker

        return run(WhisperWorker(launch).run)
    print(f"unknown worker kind {launch.kind!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
