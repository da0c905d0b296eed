"""Load text-to-image pipelines from local files, never from a hub.

Two sources are accepted: a diffusers folder (``model_index.json`` plus one
sub-folder per component), optionally as one of its weight variants (``fp16``:
``diffusion_pytorch_model.fp16.safetensors`` files), or a single ``.safetensors``
checkpoint in the original LDM layout together with a local diffusers folder that
supplies the configs. Either may take its VAE from a separate folder (an fp16-fix VAE).
Which files that means, and the refusals, are ``auditing.models.sources``'s, so the
hash covers what is loaded. Pickle-based weights (``.ckpt``, ``.bin``, ``.pt``) are
refused: loading them can run arbitrary code. SD's bundled safety checker is dropped,
because an auditor must see what the model draws, not a black square.
"""

from __future__ import annotations

import logging
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .sources import PICKLE_SUFFIXES, ModelSourceError, model_index, pipeline_files

log = logging.getLogger(__name__)

__all__ = ["ModelSourceError", "load_adapter", "load_pipeline", "load_unet_weights", "require_safetensors"]


def require_safetensors(path: str | Path, what: str) -> Path:
    """The path of an existing ``.safetensors`` file whose header parses; anything pickled is refused
    before it is opened, a damaged or forged header before any model is loaded."""
    path = Path(path)
    if path.suffix != ".safetensors":
        pickled = " (a pickle format: loading one can run code)" if path.suffix in PICKLE_SUFFIXES else ""
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


def _without_safety_checker(index: dict) -> dict:
    if "safety_checker" in index:
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


def load_pipeline(
    source: str | Path,
    config: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    variant: str | None = None,
    vae: str | Path | None = None,
) -> DiffusionPipeline:
    """Load a pipeline from a local diffusers folder or single-file checkpoint.

    ``config`` is required for a single file: a local diffusers folder of the same
    architecture (its weights are not read, only its configs and tokenizer). ``variant``
    loads a folder's ``*.<variant>.safetensors`` weights instead of the plain ones; every
    component with weights must have them. ``vae`` is an ``AutoencoderKL`` folder used in
    place of the pipeline's own VAE.
    """
    pipeline_files(source, config, variant, vae)  # every refusal before any weights are read
    source = Path(source)
    index = model_index(source if config is None else Path(config))
    components = _without_safety_checker(index)
    if vae is not None:
        components["vae"] = AutoencoderKL.from_pretrained(vae, local_files_only=True, use_safetensors=True,
                                                          torch_dtype=torch_dtype)
    if source.is_dir():
        pipe = DiffusionPipeline.from_pretrained(source, local_files_only=True, use_safetensors=True,
                                                 torch_dtype=torch_dtype, variant=variant, **components)
    else:
        pipe = getattr(diffusers, index["_class_name"]).from_single_file(  # a class sources.py accepts
            str(source), config=str(config), local_files_only=True, torch_dtype=torch_dtype, **components,
        )
    log.info("loaded %s from %s%s%s", type(pipe).__name__, source, f" ({variant})" if variant else "",
             f" with the VAE of {vae}" if vae else "")
    return pipe.to(device) if device is not None else pipe


def load_adapter(pipe, adapter: str | Path, scale: float = 1.0) -> DiffusionPipeline:
    """Apply a LoRA from a ``.safetensors`` file (diffusers/peft or kohya key format), fused at ``scale``.

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
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    log.info("applied adapter %s at scale %g", adapter, scale)
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
