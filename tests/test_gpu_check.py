"""``python -m benchmarks.gpu_check`` at reduced size, so the one-command GPU check never rots: every stage
runs through the gate's own code and reports its seconds and peak memory."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_gpu_check_runs_every_stage_at_reduced_size(capsys):
    from benchmarks.gpu_check import AUDIT_IMAGES, main

    result = main(["--size", "reduced", "--families", "sd1", "sdxl"])
    assert capsys.readouterr().out.strip().endswith("}")
    assert result["size"] == "reduced"
    for family in ("sd1", "sdxl"):
        stages = result[family]
        assert set(stages) == {"lora_bf16", "dreambooth_bf16", "audit_bfloat16"}
        assert all(s["seconds"] > 0 and s["peak_gib"] > 0 for s in stages.values())
        audit = stages["audit_bfloat16"]
        assert 0 < audit["images"] <= AUDIT_IMAGES and audit["decision"] in ("pass", "flag", "block")
