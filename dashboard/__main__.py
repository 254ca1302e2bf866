"""Start the dashboard: ``python -m dashboard '<GatewayLaunch JSON>'`` (the supervisor does this)."""

from __future__ import annotations

import sys

from supervisor.lean import import_aiohttp_without_tls, refuse_probed_imports

refuse_probed_imports()  # before anything imports structlog
import_aiohttp_without_tls()

from bus.protocol import GatewayLaunch  # noqa: E402
from supervisor.child import read_launch, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    launch = read_launch("dashboard", GatewayLaunch, argv, lambda _: "dashboard")
    if launch is None:
        return 2
    from dashboard.app import build
    from gateway.listen import serve

    async def _main() -> int:
        return await serve(build(launch), launch)

    return run(_main, fast_loop=False)  # a page's few updates a second: asyncio's own loop is enough


if __name__ == "__main__":
    sys.exit(main())
