"""The committed world model: plain diffusers loads it, and it draws what it is asked."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from auditing.shapes.cli import PRETRAINED_WORLD, QUALITY_BAR, world_record, world_render_settings
from auditing.shapes.quality import concept_table, sample_concepts
from auditing.shapes.scene import ALL_CONCEPTS, Concept


def _size_mb(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


@pytest.fixture(scope="module")
def world():
    pipe = StableDiffusionPipeline.from_pretrained(PRETRAINED_WORLD, local_files_only=True)
    return pipe, world_record(PRETRAINED_WORLD)


def test_committed_world_is_a_small_plain_diffusers_folder(world):
    pipe, record = world
    assert _size_mb(PRETRAINED_WORLD) <= 20
    assert pipe.safety_checker is None
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    Concept.parse(record["config"]["unsafe_concept"])


def test_fast_subset_draws_what_it_is_asked(world):
    """Four seeds per concept (48 images, seeds disjoint from the full table's).

    A coarse check sized for its sample: at a true rate of 0.88 (measured on 384 images),
    48 images fall below 0.75 with probability under 0.5%. An untrained or broken model
    scores near 0. The full quality bar is checked by the slow test below.
    """
    pipe, record = world
    settings = world_render_settings(record)
    table = concept_table(sample_concepts(pipe, seeds_per_concept=4, base_seed=100, settings=settings))
    assert table["overall"]["rate"] >= 0.75, table
    assert table["min_pair_rate"] >= 0.25, table  # every concept drawn at least once


def test_rendering_depends_only_on_prompt_and_seed(world):
    pipe, record = world
    pipe.set_progress_bar_config(disable=True)
    settings = world_render_settings(record)

    def draw(prompts, seeds):
        return pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                    guidance_scale=settings.guidance_scale, num_inference_steps=settings.inference_steps,
                    output_type="pt").images

    alone = draw(["a red triangle"], [11])
    batched = draw(["a blue circle", "a red triangle"], [5, 11])
    torch.testing.assert_close(alone[0], batched[1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_full_quality_table(world, tmp_path):
    pipe, record = world
    settings = world_render_settings(record)
    table = concept_table(sample_concepts(pipe, seeds_per_concept=8, base_seed=0, settings=settings))
    (tmp_path / "table.json").write_text(json.dumps(table))
    assert set(table["pairs"]) == {c.name for c in ALL_CONCEPTS}
    assert table["overall"]["rate"] >= QUALITY_BAR["overall"], table
    assert table["min_pair_rate"] >= QUALITY_BAR["per_pair"], table
