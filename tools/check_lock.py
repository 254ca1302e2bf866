"""Fail when requirements.lock no longer covers pyproject.toml (run by `make setup` after installing the lock).

Checks every requirement of the installed llama-runner (its metadata mirrors pyproject.toml: the dependencies
and the `test` extra) against what is installed in this venv. A dependency added to pyproject.toml without
`make lock` would otherwise install fine here and break on a fresh machine.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

try:
    from packaging.requirements import Requirement
except ImportError:  # packaging is not a direct dependency; pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

PROJECT = "llama-runner"
EXTRAS = ("", "test")


def problems() -> list[str]:
    found: list[str] = []
    for line in metadata.requires(PROJECT) or []:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in EXTRAS):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            found.append(f"{req} is not installed")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            found.append(f"{req} but {req.name} {version} is installed")
    return found


def main() -> int:
    found = problems()
    if found:
        print("error: requirements.lock does not match pyproject.toml:", file=sys.stderr)
        for item in found:
            print(f"  {item}", file=sys.stderr)
        print("run `make lock` and commit requirements.lock", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
