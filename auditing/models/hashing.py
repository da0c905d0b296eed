"""Content hashes of weights, for provenance records.

A model is identified by what its weights are, not by where they live: the hash of a
diffusers folder covers ``model_index.json`` and, for the components it names, their
JSON configs and the ``.safetensors`` weights the pipeline loads (by relative path and
content), not records such as a training log kept beside them, so renaming the folder
keeps the hash and changing one weight or one scheduler setting changes it. Which files
those are comes from ``auditing.models.sources.pipeline_files``: the plain weights, or a
variant's (``*.fp16.safetensors``) when one is asked for; a separate VAE folder in place
of the pipeline's ``vae/``; a single-file checkpoint with its config folder's configs. A
single-file checkpoint kept at a folder's top level (as published SD repositories keep
several) is not loaded with the folder and not hashed with it.

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
from pathlib import Path, PurePosixPath

from auditing.files import atomic_write

from .sources import pipeline_files

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


def _sha256(file: Path, cache: HashCache | None) -> str:
    return cache.sha256(file) if cache else sha256_file(file)


def weights_sha256(path: str | Path, cache: HashCache | None = None, *, config: str | Path | None = None,
                   variant: str | None = None, vae: str | Path | None = None) -> str:
    """sha256 of one ``.safetensors`` file, or of the files a pipeline loaded with these arguments reads
    (``auditing.models.sources.pipeline_files``): a variant's weights rather than the plain ones, a VAE
    folder in place of the pipeline's, a single-file checkpoint with its config folder's configs."""
    path = Path(path)
    if path.is_file() and config is None and variant is None and vae is None:
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors weights are hashed (got {path.suffix!r})")
        return _sha256(path, cache)
    return _files_sha256(pipeline_files(path, config, variant, vae), cache)


def _files_sha256(files: dict[PurePosixPath, Path], cache: HashCache | None) -> str:
    """sha256 over files keyed by their relative path, so the hash ignores where they live."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.as_posix().encode() + b"\0")
        digest.update(_sha256(files[rel], cache).encode() + b"\n")
    return digest.hexdigest()


def tree_sha256(folder: str | Path, include: Callable[[Path], bool] = lambda rel: True,
                cache: HashCache | None = None) -> str:
    """sha256 over the files of a folder that ``include`` accepts (by relative path),
    each keyed by its relative path, so the hash ignores where the folder lives."""
    folder = Path(folder)
    files = (p for p in folder.rglob("*") if p.is_file() and include(p.relative_to(folder)))
    return _files_sha256({p.relative_to(folder): p for p in files}, cache)
