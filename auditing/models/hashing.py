"""Content hashes of weights, for provenance records.

A model is identified by what its weights are, not by where they live: the hash of a
diffusers folder covers every ``.safetensors`` file (by relative path and content),
the components' JSON configs and ``model_index.json`` (not records such as a
training log kept beside them), so renaming the folder keeps the hash and
changing one weight or one scheduler setting changes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_model_file(rel: Path) -> bool:
    """Weights, component configs and model_index.json; not run records kept beside them."""
    if rel.suffix == ".safetensors":
        return True
    return rel.suffix == ".json" and (len(rel.parts) > 1 or rel.name == "model_index.json")


def weights_sha256(path: str | Path) -> str:
    """sha256 of one ``.safetensors`` file, or of a folder's weights and configs."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors weights are hashed (got {path.suffix!r})")
        return sha256_file(path)
    if not any(p.is_file() and _is_model_file(p.relative_to(path)) for p in path.rglob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no .safetensors weights found")
    return tree_sha256(path, _is_model_file)


def tree_sha256(folder: str | Path, include: Callable[[Path], bool] = lambda rel: True) -> str:
    """sha256 over the files of a folder that ``include`` accepts (by relative path),
    each keyed by its relative path, so the hash ignores where the folder lives."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and include(p.relative_to(folder)))
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(sha256_file(p).encode() + b"\n")
    return digest.hexdigest()
