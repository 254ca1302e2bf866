"""Discovery finds GGUF files and whisper folders under the models root, keeps existing entries, and never
leaves the root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from config.loader import load_config
from supervisor.discovery import discover, name_for, scan
from tests.conftest import ROOT


def make_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "Qwen2.5 0.5B-Instruct.Q4_K_M.gguf").write_bytes(b"GGUF")
    (root / "sub" / "big-00001-of-00002.gguf").write_bytes(b"GGUF")
    (root / "sub" / "big-00002-of-00002.gguf").write_bytes(b"GGUF")
    (root / "sub" / "mmproj-vision.gguf").write_bytes(b"GGUF")
    (root / "notes.txt").write_text("x")
    (root / "not-a-model.gguf").write_text("<html>a failed download</html>")  # named so, not a GGUF file
    w = root / "whisper-small"
    w.mkdir()
    for f in ("model.bin", "config.json", "tokenizer.json"):
        (w / f).write_text("{}")


def test_scan_finds_models_and_skips_shards_and_projectors(tmp_path: Path) -> None:
    make_tree(tmp_path)
    found = [(k, p.relative_to(tmp_path).as_posix()) for k, p in scan(tmp_path)]
    assert ("llama", "Qwen2.5 0.5B-Instruct.Q4_K_M.gguf") in found
    assert ("llama", "sub/big-00001-of-00002.gguf") in found
    assert ("whisper", "whisper-small") in found
    assert len(found) == 3


def test_scan_does_not_follow_linked_folders_out_of_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.gguf").write_bytes(b"GGUF")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link")
    assert scan(root) == []


def test_names_are_valid_model_names() -> None:
    assert name_for(Path("Qwen2.5 0.5B-Instruct.Q4_K_M.gguf"), "llama") == "qwen2.5-0.5b-instruct.q4_k_m"
    assert name_for(Path("big-00001-of-00002.gguf"), "llama") == "big"
    assert name_for(Path("__.gguf"), "llama") == "model"


def test_discover_adds_new_keeps_edited_and_loads(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    make_tree(root)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "app_config.json").write_text(json.dumps({"models_root": str(root)}))
    mine = {"model_path": "Qwen2.5 0.5B-Instruct.Q4_K_M.gguf", "aliases": ["q"],
            "parameters": {"ctx_size": 4096, "threads": 2, "parallel": 1, "extra_args": ["--jinja"]}}
    (cfg / "models_config.json").write_text(json.dumps({"default_model": "qwen", "models": {"qwen": mine}}))
    added = discover(cfg / "models_config.json", root)
    assert sorted(f.name for f in added) == ["big", "whisper-small"]
    doc = json.loads((cfg / "models_config.json").read_text())
    assert doc["models"]["qwen"] == mine and doc["default_model"] == "qwen"
    assert discover(cfg / "models_config.json", root) == []  # idempotent
    cfg_loaded = load_config(cfg)
    assert set(cfg_loaded.models.models) == {"qwen", "big", "whisper-small"}


def test_discover_command(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    make_tree(root)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "app_config.json").write_text("{}")
    (cfg / "models_config.json").write_text("{}")
    run = [sys.executable, "-m", "supervisor", "discover", "--config-dir", str(cfg), "--models-root", str(root)]
    out = subprocess.run([*run, "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "would add" in out.stdout
    assert json.loads((cfg / "models_config.json").read_text()) == {}
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "added llama model" in out.stdout, out.stderr


def test_discover_on_a_missing_root_says_so(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "app_config.json").write_text("{}")
    (cfg / "models_config.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "supervisor", "discover", "--config-dir", str(cfg),
                          "--models-root", str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 1 and "not a directory" in out.stderr


def _gguf(path: Path, arch: str) -> None:
    """A minimal GGUF v3 file: no tensors, one key (general.architecture)."""
    import struct

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("general.architecture") + struct.pack("<I", 8)
                     + s(arch))


def test_projectors_by_any_name_are_no_models(tmp_path: Path) -> None:
    (tmp_path / "Vendor").mkdir()
    _gguf(tmp_path / "Vendor" / "Big-Model-mmproj-f16.gguf", "clip")  # (was added as a chat model)
    _gguf(tmp_path / "vision-projector.gguf", "clip")  # named like nothing: its architecture says
    _gguf(tmp_path / "chat.gguf", "llama")
    assert [p.name for _, p in scan(tmp_path)] == ["chat.gguf"]


def test_links_out_of_the_root_are_not_read_links_within_are(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_tree(outside)
    root = tmp_path / "root"
    (root / "store").mkdir(parents=True)
    (root / "store" / "blob").write_bytes(b"GGUF")
    os.symlink(outside / "Qwen2.5 0.5B-Instruct.Q4_K_M.gguf", root / "link-out.gguf")
    os.symlink(outside / "whisper-small", root / "whisper-linked")  # (was taken: a linked folder read)
    os.symlink(root / "store" / "blob", root / "within.gguf")  # (as Hugging Face's cache links its files)
    assert [p.name for _, p in scan(root)] == ["within.gguf"]


def test_discover_from_another_root_writes_paths_that_resolve(tmp_path: Path) -> None:
    configured = tmp_path / "configured"
    make_tree(configured)
    other = tmp_path / "other"
    make_tree(other)
    (other / "inside").mkdir()
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "app_config.json").write_text(json.dumps({"models_root": str(configured)}))
    (cfg / "models_config.json").write_text(json.dumps(
        {"models": {"known": {"type": "whisper", "model_path": "whisper-small"}}}))
    # a root outside the configured one: its models are written with absolute paths (they were written relative to
    # the root scanned, and so resolved under the configured one, where they are not)
    added = discover(cfg / "models_config.json", other, config_root=configured)
    assert {f.name for f in added} == {"qwen2.5-0.5b-instruct.q4_k_m", "big", "whisper-small"}
    config = load_config(cfg)
    for f in added:
        assert Path(f.path).is_absolute() and config.model_path(config.models.models[f.name]).exists(), f
    # a folder within the configured root: relative to it; and what the config has (relative to the configured
    # root) is known as such (it was compared against the root scanned)
    (cfg / "models_config.json").write_text(json.dumps(
        {"models": {"known": {"type": "whisper", "model_path": "sub/../whisper-small"}}}))
    added = discover(cfg / "models_config.json", configured / "sub", config_root=configured)
    assert [(f.name, f.path) for f in added] == [("big", "sub/big-00001-of-00002.gguf")]
    added = discover(cfg / "models_config.json", configured, config_root=configured)
    assert "whisper-small" not in {f.name for f in added} and "big" not in {f.name for f in added}
