"""Start the dashboard: ``python -m dashboard '<GatewayLaunch JSON>'`` (the supervisor does this)."""

from __future__ import annotations

import sys

import msgspec

from bus.protocol import GatewayLaunch
from supervisor.child import run, set_parent_death_signal
from supervisor.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dashboard '<GatewayLaunch JSON>'", file=sys.stderr)
        return 2
    launch = msgspec.json.decode(args[0], type=GatewayLaunch)
    set_parent_death_signal()
    setup_logging("dashboard", launch.logs_dir)
    from dashboard.app import build
    from gateway.server import serve

    async def _main() -> int:
        return await serve(build(launch), launch)

    return run(_main)


if __name__ == "__main__":
    sys.exit(main())
