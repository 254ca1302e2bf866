"""Start the dashboard: ``python -m dashboard '<GatewayLaunch JSON>'`` (the supervisor does this)."""

from __future__ import annotations

import sys

from bus.protocol import GatewayLaunch
from supervisor.child import read_launch, run


def main(argv: list[str] | None = None) -> int:
    launch = read_launch("dashboard", GatewayLaunch, argv, lambda _: "dashboard")
    if launch is None:
        return 2
    from dashboard.app import build
    from gateway.server import serve

    async def _main() -> int:
        return await serve(build(launch), launch)

    return run(_main)


if __name__ == "__main__":
    sys.exit(main())
