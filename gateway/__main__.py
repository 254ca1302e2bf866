"""Start a gateway: ``python -m gateway '<GatewayLaunch JSON>'`` (the supervisor does this)."""

from __future__ import annotations

import sys

from supervisor.lean import import_aiohttp_without_tls, refuse_probed_imports

refuse_probed_imports()  # before anything imports structlog
import_aiohttp_without_tls()

from bus.protocol import GatewayLaunch  # noqa: E402
from supervisor.child import read_launch, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    launch = read_launch("gateway", GatewayLaunch, argv, lambda g: f"gateway-{g.protocol}")
    if launch is None:
        return 2
    # Only the protocol's own modules: the other one's would cost this process memory for nothing.
    if launch.protocol == "ollama":
        from gateway.ollama_app import build
    elif launch.protocol == "openai":
        from gateway.openai_app import build
    else:
        print(f"unknown protocol {launch.protocol!r}", file=sys.stderr)
        return 2
    from gateway.listen import serve

    async def _main() -> int:
        return await serve(build(launch), launch)

    return run(_main)


if __name__ == "__main__":
    sys.exit(main())
