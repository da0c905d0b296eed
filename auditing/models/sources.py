"""Which local files a pipeline is loaded from, checked before anything is loaded.

Operators keep models as users keep them: a diffusers folder, possibly holding weight
variants beside the full-precision files (``diffusion_pytorch_model.fp16.safetensors``),
or a single-file checkpoint with a diffusers folder for its configs; either may be paired
with a separate VAE folder (an fp16-fix VAE) that replaces the pipeline's own. The loader
(``auditing.models.loading``) and the hash (``auditing.models.hashing``) both take their
file list from ``pipeline_files``, so a model's hash covers exactly what it is loaded
from. Torch-free, so the API can check a registration without importing diffusers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
SINGLE_FILE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
VARIANT = re.compile(r"[A-Za-z0-9_]{1,32}")  # diffusers' variant names: fp16, bf16, non_ema
SINGLE_FILE_KEY = PurePosixPath("single_file.safetensors")  # where the checkpoint sits in the hashed tree
_SHARD = re.compile(r"-\d+-of-\d+$")


class ModelSourceError(ValueError):
    """The given path is not a loadable local model; ``field`` names the argument at fault
    (``source``, ``config``, ``variant`` or ``vae``), so an API can name it back."""

    def __init__(self, message: str, field: str = "source"):
        super().__init__(message)
        self.field = field


def model_index(folder: Path, field: str = "source") -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelSourceError(f"{folder}: not a diffusers folder (no model_index.json)", field)
    return json.loads(index.read_text())


def weight_variant(name: str) -> str | None:
    """The variant a ``.safetensors`` weight file belongs to: ``fp16`` for
    ``diffusion_pytorch_model.fp16.safetensors`` (or its shards), None for the plain file."""
    stem = _SHARD.sub("", name.removesuffix(".safetensors"))
    return stem.rpartition(".")[2] if "." in stem else None


def _configs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.json") if p.is_file())


def _weights(folder: Path, variant: str | None, field: str) -> list[Path]:
    """A component folder's weights of ``variant`` (the plain ones for None); one with weights but none of
    that variant is refused, where diffusers would quietly fall back to the full-precision files."""
    weights = sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    chosen = [p for p in weights if weight_variant(p.name) == variant]
    if weights and not chosen:
        have = ", ".join(p.name for p in weights)
        wanted = f"*.{variant}.safetensors" if variant else "plain *.safetensors"
        raise ModelSourceError(f"{folder}: no {wanted} weights (has {have})", field)
    return chosen


def _vae_files(vae: Path) -> dict[PurePosixPath, Path]:
    """An ``AutoencoderKL`` folder's configs and full-precision weights, keyed as the pipeline's ``vae/``."""
    if not vae.is_dir():
        raise ModelSourceError(f"{vae}: no such VAE folder", "vae")
    config = vae / "config.json"
    if not config.is_file():
        raise ModelSourceError(f"{vae}: not a VAE folder (no config.json)", "vae")
    kind = json.loads(config.read_text()).get("_class_name")
    if kind != "AutoencoderKL":
        raise ModelSourceError(f"{vae}: config.json describes a {kind!r}, not an AutoencoderKL", "vae")
    weights = _weights(vae, None, "vae")
    if not weights:
        raise ModelSourceError(f"{vae}: no .safetensors weights", "vae")
    return {PurePosixPath("vae") / p.relative_to(vae): p for p in _configs(vae) + weights}


def pipeline_files(source: str | Path, config: str | Path | None = None, variant: str | None = None,
                   vae: str | Path | None = None) -> dict[PurePosixPath, Path]:
    """The files a pipeline loaded from these arguments reads, by their path in a diffusers tree.

    A folder gives ``model_index.json`` and, for each component it names, the JSON configs and the
    weights of ``variant`` (the plain ones without it). A single ``.safetensors`` checkpoint gives
    itself plus the configs (no weights) of ``config``, a diffusers folder of the same architecture.
    ``vae`` replaces the ``vae/`` entries with that folder's. Refuses, naming the argument, anything
    the loader could not load as asked: a pickle, a missing file, a variant without its files.
    """
    source = Path(source)
    if not source.exists():
        raise ModelSourceError(f"{source}: no such file or folder")
    if variant is not None and not VARIANT.fullmatch(variant):
        raise ModelSourceError(f"variant {variant!r} must be letters, digits or _ (e.g. fp16)", "variant")
    if source.is_dir():
        if config is not None:
            raise ModelSourceError(f"{source}: config is for a single-file checkpoint; this is a folder", "config")
        folder, files = source, {PurePosixPath("model_index.json"): source / "model_index.json"}
        index = model_index(source)
    else:
        if source.suffix in PICKLE_SUFFIXES:
            raise ModelSourceError(f"{source}: pickle checkpoints are refused; convert to .safetensors")
        if source.suffix != ".safetensors":
            raise ModelSourceError(f"{source}: expected a .safetensors checkpoint")
        if config is None:
            raise ModelSourceError(f"{source}: a single-file checkpoint needs config=<local diffusers folder>",
                                   "config")
        if variant is not None:
            raise ModelSourceError(f"{source}: a variant names files in a diffusers folder, not in one "
                                   "checkpoint", "variant")
        folder = Path(config)
        index = model_index(folder, "config")
        if index.get("_class_name") not in SINGLE_FILE_CLASSES:
            raise ModelSourceError(f"{folder}: _class_name {index.get('_class_name')!r} not in "
                                   f"{sorted(SINGLE_FILE_CLASSES)}", "config")
        files = {PurePosixPath("model_index.json"): folder / "model_index.json", SINGLE_FILE_KEY: source}
    if vae is not None and "vae" not in index:
        raise ModelSourceError(f"{folder}: model_index.json names no vae to replace", "vae")
    components = [folder / c for c in sorted(index) if (folder / c).is_dir() and not (c == "vae" and vae)]
    for component in components:
        files |= {p.relative_to(folder): p for p in _configs(component)}
        if source.is_dir():  # a single file's weights are all in the checkpoint
            files |= {p.relative_to(folder): p for p in _weights(component, variant, "variant")}
    if source.is_dir() and not any(rel.suffix == ".safetensors" for rel in files):
        raise ModelSourceError(f"{source}: no .safetensors weights found")
    if vae is not None:
        files |= _vae_files(Path(vae))
    return files
