"""The audit profile as the gate resolves it on a worker: precision per device, render size per model family."""

from __future__ import annotations

import pytest

from auditing.models.tiny import TinySpec, build_tiny_pipeline
from auditing.render import Renderer, RenderSettings
from gate.pipeline.profile import AuditProfile


@pytest.fixture
def probes(tmp_path):
    path = tmp_path / "i2p.csv"  # an I2P row says 512 x 512, as the published file does for SD 1.4
    path.write_text("prompt,categories,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height\n"
                    "a red triangle,sexual,7,7.5,512,512\n")
    return str(path)


def test_precision_defaults_to_half_on_gpus_and_keys_its_own_baseline(probes):
    profile = AuditProfile(probes=probes)
    assert profile.render_settings().dtype == profile.render_settings(None).dtype == "float32"
    assert profile.render_settings("cuda").dtype == "float16"
    assert profile.sha256() != profile.sha256("cuda")  # a GPU worker never pairs with a CPU worker's baseline
    pinned = AuditProfile(probes=probes, dtype="bfloat16")
    assert pinned.render_settings("cuda").dtype == pinned.render_settings().dtype == "bfloat16"
    assert pinned.sha256() == pinned.sha256("cuda")


def test_probe_files_sizes_give_way_to_the_profile_or_the_models_own(probes):
    assert {(i.width, i.height) for i in AuditProfile(probes=probes).load_probes().images} == {(None, None)}
    assert {(i.width, i.height) for i in AuditProfile(probes=probes, resolution=64).load_probes().images} == {(64, 64)}
    for bad in (60, 4, 4096, True, "512"):
        with pytest.raises(ValueError, match="resolution"):
            AuditProfile(probes=probes, resolution=bad)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_models_own_size_is_what_a_probe_without_one_renders_at(probes, family):
    pipe = build_tiny_pipeline(TinySpec(family=family))
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    profile = AuditProfile(probes=probes, inference_steps=1, us_classifier=None)
    renderer = Renderer(pipe, "sha", settings=RenderSettings(inference_steps=1))
    image, = renderer.render(list(profile.load_probes().images))
    assert image.size == (native, native) and native != 512


def test_the_model_check_is_validated_at_registration(probes, tmp_path):
    assert AuditProfile(probes=probes).model_check_inputs() is None
    settings, references, controls = AuditProfile(probes=probes, model_check={
        "references": "red triangle", "images": 4}).model_check_inputs()
    assert settings.images == 4 and len(references) == len(controls) == 4
    folder = tmp_path / "refs"
    folder.mkdir()
    for bad, field in (({"references": str(folder)}, "controls"), ({}, "references"),
                       ({"references": "red triangle", "timesteps": [-1]}, "timesteps"),
                       ({"references": "red triangle", "margin": 1}, "margin"), ("on", "object")):
        with pytest.raises(ValueError, match=field):
            AuditProfile(probes=probes, model_check=bad)


def test_a_stricter_model_check_decides_and_says_so():
    from auditing.audit import MODEL_CHECK, AuditOutcome, with_model_check

    verdict = {"decision": "pass", "reasons": ["unsafe rate 0.01 within the ceiling"], "family": "profile"}
    audit = AuditOutcome({"verdict": verdict})
    check = {"decision": "block", "reasons": ["prompt 'a zorblat': fell 0.2"], "seconds": 1.0}
    blocked = with_model_check(audit, check).report
    assert blocked["verdict"]["decision"] == "block" and blocked["verdict"]["family"] == MODEL_CHECK
    assert blocked["verdict"]["reasons"] == ["model check: prompt 'a zorblat': fell 0.2"]
    kept = with_model_check(audit, {**check, "decision": "pass"}).report
    assert kept["verdict"] == verdict and kept["model_check"]["decision"] == "pass"
