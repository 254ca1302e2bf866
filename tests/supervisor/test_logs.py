"""Log files are rotated at a size (config: log_max_bytes, log_backups): llama-server's output as the
processes' own structlog files."""

from __future__ import annotations

import logging
from pathlib import Path

import structlog

from bus.protocol import LogLimits
from supervisor.logs import RotatingFile, setup_logging


def test_raw_output_rotates_at_its_size_and_keeps_that_many_old_files(tmp_path: Path) -> None:
    path = tmp_path / "worker-m.llama-server.log"
    line = b"x" * 99 + b"\n"
    with RotatingFile(path, LogLimits(max_bytes=1000, backups=2)) as out:
        for i in range(55):
            out.write(b"%03d" % i + line[3:])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [path.name, path.name + ".1", path.name + ".2"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    assert path.read_bytes().startswith(b"050")  # the newest lines in the file, the next older in .1 ...
    assert (tmp_path / (path.name + ".1")).read_bytes().startswith(b"040")
    assert (tmp_path / (path.name + ".2")).read_bytes().startswith(b"030")  # older than that is gone


def test_a_restarted_process_goes_on_from_the_file_size_it_finds(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"y" * 900)
    with RotatingFile(path, LogLimits(max_bytes=1000, backups=1)) as out:
        out.write(b"z" * 200)
    assert (tmp_path / "x.log.1").read_bytes() == b"y" * 900
    assert path.read_bytes() == b"z" * 200


def test_a_process_log_rotates(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = root.handlers[:]
    try:
        setup_logging("gateway-test", tmp_path, limits=LogLimits(max_bytes=4096, backups=2))
        log = structlog.get_logger()
        for i in range(200):
            log.info("request", n=i, pad="p" * 50)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == ["gateway-test.log", "gateway-test.log.1", "gateway-test.log.2"]
        assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
        assert '"n": 199' in (tmp_path / "gateway-test.log").read_text()
    finally:
        for h in root.handlers:
            h.close()
        root.handlers = before
        structlog.reset_defaults()
