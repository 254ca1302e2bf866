"""Start a gateway: ``python -m gateway '<GatewayLaunch JSON>'`` (the supervisor does this)."""

from __future__ import annotations

import sys

from bus.protocol import GatewayLaunch
from supervisor.child import read_launch, run


def main(argv: list[str] | None = None) -> int:
    launch = read_launch("gateway", GatewayLaunch, argv, lambda g: f"gateway-{g.protocol}")
    if launch is None:
        return 2
    from gateway import ollama_app, openai_app
    from gateway.server import serve

    builders = {"ollama": ollama_app.build, "openai": openai_app.build}
    if launch.protocol not in builders:
        print(f"unknown protocol {launch.protocol!r}", file=sys.stderr)
        return 2

    async def _main() -> int:
        return await serve(builders[launch.protocol](launch), launch)

    return run(_main)


if __name__ == "__main__":
    sys.exit(main())
