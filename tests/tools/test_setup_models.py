"""The setup copies the packaged models into the models root: a copy outlives the checkout's .venv, an old
symlink is replaced, a person's own file is left alone, and a second run changes nothing."""

from __future__ import annotations

from pathlib import Path

from tools.setup_runtime import _place


def test_place_copies_replaces_links_and_keeps_foreign_files(tmp_path: Path) -> None:
    src_file = tmp_path / "venv" / "m.gguf"
    src_dir = tmp_path / "venv" / "whisper"
    src_dir.mkdir(parents=True)
    src_file.write_bytes(b"GGUF" * 10)
    (src_dir / "model.bin").write_bytes(b"x" * 7)
    root = tmp_path / "models"
    root.mkdir()
    (root / "m.gguf").symlink_to(src_file)  # what an older setup left
    _place(root / "m.gguf", src_file)
    _place(root / "whisper", src_dir)
    assert not (root / "m.gguf").is_symlink() and (root / "m.gguf").read_bytes() == src_file.read_bytes()
    assert (root / "whisper" / "model.bin").read_bytes() == b"x" * 7
    src_file.unlink()  # the checkout's venv is gone: the models root still works
    assert (root / "m.gguf").stat().st_size == 40
    mine = root / "mine.gguf"
    mine.write_bytes(b"a person's model")
    _place(mine, src_dir / "model.bin")
    assert mine.read_bytes() == b"a person's model"
    before = (root / "whisper" / "model.bin").stat().st_mtime_ns
    _place(root / "whisper", src_dir)  # in place: not copied again
    assert (root / "whisper" / "model.bin").stat().st_mtime_ns == before
