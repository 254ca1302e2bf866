"""``python -m supervisor`` and the ``llama-runner`` command."""

import sys

from supervisor.lean import refuse_probed_imports


def main() -> int:
    # `up` is the long-running supervisor: plain asyncio, no TLS anywhere in it.
    refuse_probed_imports(ssl=sys.argv[1:2] == ["up"])
    from supervisor.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
