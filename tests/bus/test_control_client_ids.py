"""Request ids (bus/control_client.new_id): unique within a process and between processes."""

from __future__ import annotations

import subprocess
import sys

from bus.control_client import new_id
from tests.conftest import ROOT


def test_ids_are_unique_in_a_process_and_between_processes() -> None:
    mine = {new_id() for _ in range(10_000)}
    assert len(mine) == 10_000
    code = "from bus.control_client import new_id; print(' '.join(new_id() for _ in range(1000)))"
    other = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split())
    assert len(other) == 1000 and not mine & other
