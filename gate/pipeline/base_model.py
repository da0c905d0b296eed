"""A registered base model's files, loaded and hashed one way in every stage.

A base model is a folder or a single-file checkpoint with its config folder, possibly as a weight variant
and with a separate VAE (``gate.storage.models.BaseModel``). Training, the baseline and checkpoint audits
all load it through ``load_base`` and check it through ``base_sha256``, so each stage reads the files the
registration hashed, never the folder's other variant or VAE.
"""

from __future__ import annotations

from auditing.models.hashing import HashCache, weights_sha256
from gate.storage.models import BaseModel


def _source(base: BaseModel) -> dict:
    return {"config": base.config_path, "variant": base.variant, "vae": base.vae_path}


def base_sha256(base: BaseModel, cache: HashCache | None = None) -> str:
    """The hash of the files the base model is loaded from, as recorded at registration."""
    return weights_sha256(base.path, cache, **_source(base))


def load_base(base: BaseModel, torch_dtype=None, device=None):
    """The base model's pipeline (``auditing.models.loading.load_pipeline``), as registered."""
    from auditing.models.loading import load_pipeline

    return load_pipeline(base.path, torch_dtype=torch_dtype, device=device, **_source(base))
