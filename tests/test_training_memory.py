"""The GPU-memory estimate the API refuses jobs with: its per-family figures are what the published
architectures measure on the meta device, and it moves the way memory does."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from gate.training import settings_for
from gate.training.memory import FOOTPRINTS, GIB, estimate_bytes, family_of


@pytest.mark.parametrize("family", sorted(FOOTPRINTS))
def test_the_table_is_what_the_published_architectures_measure(family):
    from benchmarks.training_memory import footprint

    measured = footprint(family)
    table = asdict(FOOTPRINTS[family])
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in table.items()} == \
        {k: measured[k] for k in table}


def _lora(**extra):
    return settings_for("lora", extra)


def test_the_estimate_moves_the_way_memory_does():
    base = _lora(batch_size=1, mixed_precision="bf16")
    one = estimate_bytes("sd1", "lora", base)
    assert estimate_bytes("sd1", "lora", replace(base, batch_size=4)) > one
    assert estimate_bytes("sd1", "lora", replace(base, resolution=768)) > one
    assert estimate_bytes("sd1", "lora", replace(base, mixed_precision="no")) > one
    assert estimate_bytes("sd1", "lora", replace(base, gradient_checkpointing=True)) < one
    assert estimate_bytes("sd1", "lora", replace(base, train_text_encoder=True)) > one
    assert estimate_bytes("sdxl", "lora", base) > estimate_bytes("sd2", "lora", base) > one
    dreambooth = settings_for("dreambooth", {"instance_prompt": "a sks dog", "mixed_precision": "bf16"})
    assert estimate_bytes("sd1", "dreambooth", dreambooth) > one


def test_the_estimate_orders_jobs_as_hardware_classes_do():
    # an SD 1.5 LoRA at 512 px in half precision fits a 12 GB card; full SDXL DreamBooth does not fit 40 GB
    assert estimate_bytes("sd1", "lora", _lora(batch_size=1, mixed_precision="fp16")) < 12 * GIB
    sdxl_dreambooth = settings_for("dreambooth", {"instance_prompt": "a sks dog", "mixed_precision": "bf16",
                                                  "gradient_checkpointing": True})
    assert estimate_bytes("sdxl", "dreambooth", sdxl_dreambooth) > 40 * GIB


def _folder(tmp_path, name, class_name, width):
    folder = tmp_path / name
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    (folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": width}))
    return folder


def test_family_comes_from_the_folders_configs(tmp_path):
    assert family_of(_folder(tmp_path, "a", "StableDiffusionPipeline", 768)) == "sd1"
    assert family_of(_folder(tmp_path, "b", "StableDiffusionPipeline", 1024)) == "sd2"
    assert family_of(_folder(tmp_path, "c", "StableDiffusionXLPipeline", 2048)) == "sdxl"
    assert family_of(_folder(tmp_path, "d", "StableDiffusionPipeline", 32)) is None  # a tiny test model
    assert family_of(tmp_path / "missing") is None
