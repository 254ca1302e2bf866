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
    path: str  # relative to the configured models root (absolute if outside it)


def _inside(path: Path, root: Path) -> bool:
    """Is ``path``, its links followed, under ``root`` (resolved)? A link out of the root is not followed."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop
        return False


def _is_whisper_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in WHISPER_FILES) and (
        (path / "tokenizer.json").is_file() or (path / "vocabulary.txt").is_file())


def _usable_gguf(path: Path) -> bool:
    name = path.name.lower()
    if not name.endswith(".gguf") or "mmproj" in name:
        return False
    m = SHARD.search(name)
    if m is not None and m.group(1) != "00001":  # a split model is loaded from its first shard
        return False
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":  # (a file named .gguf that is not one is no model)
                return False
    except OSError:
        return False
    from gateway.gguf_info import read_facts  # (stdlib only: reads the header, never the weights)

    return read_facts(path).architecture != "clip"  # a vision projector (mmproj) by any name is no model


MAX_DEPTH = 4  # folders below the root that are searched


def scan(root: Path, max_depth: int = MAX_DEPTH) -> list[tuple[str, Path]]:
    """(kind, path) of every model under ``root``; does not descend into linked folders, and reads nothing a link
    leads to outside the root (a link to a file or folder within it is taken)."""
    out: list[tuple[str, Path]] = []
    root = root.expanduser()
    if not root.is_dir():
        return out
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        for d in list(dirnames):
            if not _inside(here / d, real_root):
                dirnames.remove(d)
            elif _is_whisper_dir(here / d):
                out.append(("whisper", here / d))
                dirnames.remove(d)
        if depth >= max_depth:
            dirnames.clear()
        for f in filenames:
            if _inside(here / f, real_root) and (here / f).is_file() and _usable_gguf(here / f):
                out.append(("llama", here / f))
    return sorted(out, key=lambda kp: str(kp[1]))


def name_for(path: Path, kind: str) -> str:
    stem = path.name if kind == "whisper" else SHARD.sub("", path.name)
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    name = NAME_OK.sub("-", stem).strip("-._").lower() or "model"
    if not name[0].isalnum():
        name = "m" + name
    return name[:120]


def discover(config_path: Path, models_root: Path, *, config_root: Path | None = None,
             write: bool = True) -> list[Found]:
    """Add every model under ``models_root`` not yet in ``config_path``; returns what was added. ``config_root``:
    the models root the config's relative paths are read against (default: ``models_root``); a model outside it
    is written with its absolute path."""
    doc: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
    models: dict[str, Any] = doc.setdefault("models", {})
    root = Path(os.path.abspath(models_root.expanduser()))
    base_dir = Path(os.path.abspath((config_root or models_root).expanduser()))
    known = set()
    for existing in models.values():
        p = Path(str(existing.get("model_path", ""))).expanduser()
        known.add(os.path.normpath(p if p.is_absolute() else base_dir / p))
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
        rel = str(path.relative_to(base_dir)) if path.is_relative_to(base_dir) else str(path)
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
