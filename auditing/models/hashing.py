"""Content hashes of weights, for provenance records.

A model is identified by what its weights are, not by where they live: the hash of a
diffusers folder covers every ``.safetensors`` file (by relative path and content),
the components' JSON configs and ``model_index.json`` (not records such as a
training log kept beside them), so renaming the folder keeps the hash and
changing one weight or one scheduler setting changes it. Only the component sub-folders
``model_index.json`` names are covered: a single-file checkpoint kept at a folder's top
level (as published SD repositories keep several) is not loaded by the pipeline and not
hashed.

A ``HashCache`` keeps each file's sha256 under its size, mtime and inode, so a service
that checks a multi-gigabyte base model before every audit reads it once per change;
entries older than the cache's ``max_age_s`` are read again, which catches a change that
kept size and times (a restore that preserves them) within that period.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from auditing.files import atomic_write

_CHUNK = 1 << 20
DAY_S = 86_400


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """File sha256s in a JSON file, valid while a file's (size, mtime, inode) is unchanged and for at
    most ``max_age_s`` seconds. Several processes may share one file: a lost update costs a re-read."""

    def __init__(self, path: str | Path, max_age_s: float = DAY_S):
        self.path, self.max_age_s = Path(path), max_age_s

    def _entries(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key, stamp = str(file.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
        entries = self._entries()
        entry = entries.get(key)
        if entry and entry["stat"] == stamp and time.time() - entry["hashed_at"] < self.max_age_s:
            return entry["sha256"]
        digest = sha256_file(file)
        entries = self._entries()  # re-read: another process may have added entries meanwhile
        entries[key] = {"stat": stamp, "sha256": digest, "hashed_at": time.time()}
        atomic_write(self.path, json.dumps(entries))
        return digest


def _model_files(folder: Path) -> Callable[[Path], bool]:
    """model_index.json, and the weights and JSON configs of the components it names."""
    index = folder / "model_index.json"
    components = set(json.loads(index.read_text())) if index.is_file() else None

    def include(rel: Path) -> bool:
        if rel.as_posix() == "model_index.json":
            return True
        if rel.suffix not in (".safetensors", ".json") or len(rel.parts) < 2:
            return False
        return components is None or rel.parts[0] in components
    return include


def weights_sha256(path: str | Path, cache: HashCache | None = None) -> str:
    """sha256 of one ``.safetensors`` file, or of a folder's weights and configs."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors weights are hashed (got {path.suffix!r})")
        return cache.sha256(path) if cache else sha256_file(path)
    include = _model_files(path)
    if not any(p.is_file() and include(p.relative_to(path)) for p in path.rglob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no .safetensors weights found")
    return tree_sha256(path, include, cache)


def tree_sha256(folder: str | Path, include: Callable[[Path], bool] = lambda rel: True,
                cache: HashCache | None = None) -> str:
    """sha256 over the files of a folder that ``include`` accepts (by relative path),
    each keyed by its relative path, so the hash ignores where the folder lives."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and include(p.relative_to(folder)))
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.relative_to(folder).as_posix().encode() + b"\0")
        digest.update((cache.sha256(p) if cache else sha256_file(p)).encode() + b"\n")
    return digest.hexdigest()
