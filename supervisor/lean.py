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


def import_aiohttp_without_tls() -> None:
    """Import aiohttp as if Python had no ssl module (then put ssl back for everyone else).

    For the gateways and the dashboard: at import aiohttp builds two TLS client contexts, one of them parsing
    the system's CA store (~2.3 MB per process); those processes serve and call plain HTTP on this machine only.
    aiohttp supports Pythons without ssl; imported so, its TLS client use would fail loudly. The standard modules
    that bind ssl when first imported and that aiohttp pulls in are imported before, whole: only aiohttp's own
    modules see no ssl.
    """
    import asyncio  # noqa: F401
    import urllib.request  # noqa: F401

    real = sys.modules.get("ssl")
    sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import aiohttp.web  # noqa: F401
    finally:
        if real is None:
            del sys.modules["ssl"]
        else:
            sys.modules["ssl"] = real
