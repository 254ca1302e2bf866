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
