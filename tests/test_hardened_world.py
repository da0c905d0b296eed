"""The packaged hardened world: the base world plus the ResAlign run's low-rank difference, and nothing else."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from alignment.hardened_world import DELTA, MANIFEST, UNET_WEIGHTS, materialize
from auditing.shapes.cli import PRETRAINED_WORLD


def test_materialized_world_differs_from_the_base_only_in_attention_projections(tmp_path):
    out = materialize(tmp_path / "hardened")
    base, hardened = load_file(PRETRAINED_WORLD / UNET_WEIGHTS), load_file(out / UNET_WEIGHTS)
    changed = sorted(k for k in base if not base[k].equal(hardened[k]))
    assert changed and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))
                           for k in changed)
    assert len(changed) == json.loads(MANIFEST.read_text())["matrices"] == len(load_file(DELTA)) // 2
    assert (out / "world.json").is_file() and (out / "hardening.json").is_file()  # still a world; provenance
    assert materialize(tmp_path / "hardened") == out  # built once
