"""Model discovery: find GGUF files and faster-whisper model folders under the models root and add the new ones
to models_config.json. Entries a person wrote are kept as they are; nothing outside the models root is read."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WHISPER_FILES = ("model.bin", "config.json")
SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
NAME_OK = re.compile(r"[^A-Za-z0-9._:@+-]+")


@dataclass(frozen=True)
class Found:
    name: str
    kind: str  # "llama" | "whisper"
    path: str  # relative to the models root


def _is_whisper_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in WHISPER_FILES) and (
        (path / "tokenizer.json").is_file() or (path / "vocabulary.txt").is_file())


def _usable_gguf(path: Path) -> bool:
    name = path.name.lower()
    if not name.endswith(".gguf") or name.startswith("mmproj"):
        return False
    m = SHARD.search(name)
    if m is not None and m.group(1) != "00001":  # a split model is loaded from its first shard
        return False
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"  # (a file named .gguf that is not one is no model)
    except OSError:
        return False


def scan(root: Path, max_depth: int = 4) -> list[tuple[str, Path]]:
    """(kind, path) of every model under ``root``; does not descend into linked folders or leave the root."""
    out: list[tuple[str, Path]] = []
    root = root.expanduser()
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        for d in list(dirnames):
            if _is_whisper_dir(here / d):
                out.append(("whisper", here / d))
                dirnames.remove(d)
        if depth >= max_depth:
            dirnames.clear()
        for f in filenames:
            if _usable_gguf(here / f) and (here / f).is_file():
                out.append(("llama", here / f))
    return sorted(out, key=lambda kp: str(kp[1]))


def name_for(path: Path, kind: str) -> str:
    stem = path.name if kind == "whisper" else SHARD.sub("", path.name)
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    name = NAME_OK.sub("-", stem).strip("-._").lower() or "model"
    if not name[0].isalnum():
        name = "m" + name
    return name[:120]


def discover(config_path: Path, models_root: Path, *, write: bool = True) -> list[Found]:
    """Add every model under ``models_root`` not yet in ``config_path``; returns what was added."""
    doc: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
    models: dict[str, Any] = doc.setdefault("models", {})
    root = models_root.expanduser()
    known = set()
    for existing in models.values():
        p = Path(str(existing.get("model_path", ""))).expanduser()
        known.add(os.path.normpath(p if p.is_absolute() else root / p))
    taken = set(models) | {a for e in models.values() for a in e.get("aliases", [])}
    added: list[Found] = []
    for kind, path in scan(root):
        if os.path.normpath(path) in known:
            continue
        base = name_for(path, kind)
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        rel = str(path.relative_to(root))
        entry: dict[str, Any] = {"type": kind, "model_path": rel}
        if kind == "llama":
            entry["parameters"] = {"ctx_size": 2048, "threads": 1, "parallel": 1, "extra_args": []}
        models[name] = entry
        added.append(Found(name, kind, rel))
    if write and added:
        tmp = config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, config_path)
    return added
