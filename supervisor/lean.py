"""Keep our long-running processes small: refuse imports that libraries only probe for.

Called first by each process entry point (``llama-runner up`` and the children's ``__main__``), before anything
imports structlog or asyncio; never from a module other code imports (the tests' browser driver needs greenlet).
"""

from __future__ import annotations

import sys


def refuse_probed_imports(*, ssl: bool = False) -> None:
    """greenlet: structlog probes for it at import (its thread-local shim), and it is in the venv only as the
    test browser driver's dependency; none of our processes runs in greenlets (1.1 MB each).

    ``ssl``: asyncio and aiohttp import it when present and work without it (``ssl = None``); a process that
    never speaks TLS saves the ~4 MB its enum tables cost. Only for processes that run no event loop library
    requiring it (uvloop imports ssl) and no TLS client.
    """
    sys.modules.setdefault("greenlet", None)  # type: ignore[arg-type]
    if ssl:
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
