"""Start a gateway: ``python -m gateway '<GatewayLaunch JSON>'`` (the supervisor does this)."""

from __future__ import annotations

import sys

import msgspec

from bus.protocol import GatewayLaunch
from supervisor.child import run, set_parent_death_signal
from supervisor.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gateway '<GatewayLaunch JSON>'", file=sys.stderr)
        return 2
    launch = msgspec.json.decode(args[0], type=GatewayLaunch)
    set_parent_death_signal()
    setup_logging(f"gateway-{launch.protocol}", launch.logs_dir)
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
