"""Load text-to-image pipelines from local files, never from a hub.

Two sources are accepted: a diffusers folder (``model_index.json`` plus one
sub-folder per component) or a single ``.safetensors`` checkpoint in the original
LDM layout together with a local diffusers folder that supplies the configs.
Pickle-based weights (``.ckpt``, ``.bin``, ``.pt``) are refused: loading them can
run arbitrary code. SD's bundled safety checker is dropped, because an auditor
must see what the model draws, not a black square.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

log = logging.getLogger(__name__)

_SINGLE_FILE_CLASSES = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}
_PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


class ModelSourceError(ValueError):
    """The given path is not a loadable local model."""


def require_safetensors(path: str | Path, what: str) -> Path:
    """The path of an existing ``.safetensors`` file whose header parses; anything pickled is refused
    before it is opened, a damaged or forged header before any model is loaded."""
    path = Path(path)
    if path.suffix != ".safetensors":
        pickled = " (a pickle format: loading one can run code)" if path.suffix in _PICKLE_SUFFIXES else ""
        raise ModelSourceError(f"{path}: {what} accepted as .safetensors only, got {path.suffix or 'no suffix'!r}"
                               f"{pickled}")
    if not path.is_file():
        raise ModelSourceError(f"{path}: no such {what} file")
    try:
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as exc:
        raise ModelSourceError(f"{path}: not a readable .safetensors file ({exc})") from None
    return path


def _model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelSourceError(f"{folder}: not a diffusers folder (no model_index.json)")
    return json.loads(index.read_text())


def _without_safety_checker(index: dict) -> dict:
    if "safety_checker" in index:
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


def load_pipeline(
    source: str | Path,
    config: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> DiffusionPipeline:
    """Load a pipeline from a local diffusers folder or single-file checkpoint.

    ``config`` is required for a single file: a local diffusers folder of the same
    architecture (its weights are not read, only its configs and tokenizer).
    """
    source = Path(source)
    if not source.exists():
        raise ModelSourceError(f"{source}: no such file or folder")
    if source.is_dir():
        index = _model_index(source)
        pipe = DiffusionPipeline.from_pretrained(
            source, local_files_only=True, use_safetensors=True, torch_dtype=torch_dtype,
            **_without_safety_checker(index),
        )
    else:
        if source.suffix in _PICKLE_SUFFIXES:
            raise ModelSourceError(f"{source}: pickle checkpoints are refused; convert to .safetensors")
        if source.suffix != ".safetensors":
            raise ModelSourceError(f"{source}: expected a .safetensors checkpoint")
        if config is None:
            raise ModelSourceError(f"{source}: a single-file checkpoint needs config=<local diffusers folder>")
        config = Path(config)
        index = _model_index(config)
        cls = _SINGLE_FILE_CLASSES.get(index.get("_class_name"))
        if cls is None:
            raise ModelSourceError(
                f"{config}: _class_name {index.get('_class_name')!r} not in {sorted(_SINGLE_FILE_CLASSES)}"
            )
        pipe = cls.from_single_file(
            str(source), config=str(config), local_files_only=True, torch_dtype=torch_dtype,
            **_without_safety_checker(index),
        )
    log.info("loaded %s from %s", type(pipe).__name__, source)
    return pipe.to(device) if device is not None else pipe


def load_adapter(pipe, adapter: str | Path) -> DiffusionPipeline:
    """Apply a LoRA from a ``.safetensors`` file (diffusers/peft or kohya key format), fused.

    diffusers recognises the key format; ``use_safetensors=True`` makes it refuse
    anything else rather than fall back to unpickling. The adapter is then fused into the
    base weights and its layers dropped: rendering runs at the base model's speed, with
    the same images up to float rounding.
    """
    adapter = require_safetensors(adapter, "adapter")
    try:
        pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name, use_safetensors=True)
    except ValueError as exc:  # diffusers' refusal of keys it cannot map onto this pipeline
        raise ModelSourceError(f"{adapter}: not a LoRA for this pipeline ({exc})") from None
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    log.info("applied adapter %s", adapter)
    return pipe


def load_unet_weights(pipe, weights: str | Path) -> DiffusionPipeline:
    """Replace the UNet's weights with a full fine-tuned state dict (a DreamBooth artifact).

    Loaded strictly: a file for another architecture, or with keys missing, raises instead
    of leaving part of the base model in place.
    """
    weights = require_safetensors(weights, "UNet weights")
    try:
        pipe.unet.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as exc:
        raise ModelSourceError(f"{weights}: not a UNet state dict for this pipeline ({exc})") from None
    log.info("applied UNet weights %s", weights)
    return pipe
