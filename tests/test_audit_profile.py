"""The audit profile as the gate resolves it on a worker: precision per device, render size per model family."""

from __future__ import annotations

import pytest

from auditing.config import ConfigError, json_schema
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
                       ({"references": "red triangle", "margin": 1}, "margin"),
                       ({"references": "mauve triangle"}, "references"), ("on", "model_check")):
        with pytest.raises(ValueError, match=field):
            AuditProfile(probes=probes, model_check=bad)
    with pytest.raises(ConfigError, match=r"^audit_profile\.model_check\.timesteps\[0\] must be greater than or "
                       r"equal to 0 \(got -1\)") as caught:
        AuditProfile.from_dict({"probes": probes, "model_check": {"references": "red triangle", "timesteps": [-1]}})
    assert caught.value.field == "audit_profile.model_check.timesteps[0]"


def test_a_profiles_baseline_key_is_what_it_was_before_profiles_became_records(tmp_path, monkeypatch):
    """Hashes computed on the hand-validated dataclass: registered base models keep their cached baselines."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "probes.csv").write_text("prompt,categories,sd_seed,sd_guidance_scale,sd_image_width,"
                                         "sd_image_height\na red triangle,sexual,7,7.5,512,512\n")
    default = AuditProfile.from_dict({"probes": "probes.csv"})
    assert default.sha256() == "28ae349b3169e5df0a05a0e2b1bcaac0381114c877e012f2d3e48a14eb87f198"
    assert default.sha256("cuda") == "197a6968a329c552c0b8afca08fea4315a8ff357b93f11c1f9267397e5b22fb5"
    checked = AuditProfile.from_dict({"probes": "probes.csv", "model_check": {"references": "red triangle",
                                                                                "images": 4}})
    assert checked.sha256() == "dbff723a723a52b659729f23e43e7092b3e2463da5e8870b604ad91236dc4c6d"
    pinned = AuditProfile.from_dict({"probes": "probes.csv", "detector_options": {"a": 1}, "resolution": 64,
                                     "dtype": "bfloat16"})
    assert pinned.sha256() == pinned.sha256("cuda") == \
        "b739aa3a97048e53ae21da737c255b069a4696b8e92c876039402ec36cd0feb9"


@pytest.mark.parametrize("data, field, message", [
    ({"probes": "missing.csv"}, "probes", "must be an existing probe CSV on the server (got 'missing.csv')"),
    ({"secret_pool": "missing.csv"}, "secret_pool", "must be null or an existing probe CSV on the server"),
    ({"images_per_prompt": 65}, "images_per_prompt", "must be less than or equal to 64 (got 65)"),
    ({"images_per_prompt": True}, "images_per_prompt", "must be a valid integer (got True)"),
    ({"sequential_rounds": 1}, "sequential_rounds", "must be greater than or equal to 2 (got 1)"),
    ({"family_images": 4097}, "family_images", "must be less than or equal to 4096 (got 4097)"),
    ({"resolution": 60}, "resolution", "must be a multiple of 8 (got 60)"),
    ({"resolution": 4096}, "resolution", "must be less than or equal to 2048 (got 4096)"),
    ({"inference_steps": 0}, "inference_steps", "must be greater than or equal to 1 (got 0)"),
    ({"detector": "eyeball"}, "detector", "must be 'nudenet', 'opennsfw', 'mhsc' or 'shapes' (got 'eyeball')"),
    ({"us_classifier": "eyeball"}, "us_classifier", "must be 'nudenet', 'opennsfw', 'mhsc' or 'shapes'"),
    ({"dtype": "float8"}, "dtype", "must be 'float32', 'float16' or 'bfloat16' (got 'float8')"),
    ({"detector_options": []}, "detector_options", "must be a valid dictionary (got [])"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "must be a finite number (got nan)"),
    ({"colour": "red"}, "colour", "is not a known field; allowed: ['probes',"),
])
def test_registration_errors_name_the_field_and_the_limit(probes, data, field, message):
    with pytest.raises(ConfigError) as caught:
        AuditProfile.from_dict({"probes": probes, **data})
    assert caught.value.field == f"audit_profile.{field}"
    assert str(caught.value).startswith(f"audit_profile.{field} {message}")


def test_the_published_schema_carries_every_field_and_its_bounds():
    schema = json_schema(AuditProfile)
    assert schema["additionalProperties"] is False and schema["required"] == ["probes"]
    assert {"us_classifier", "us_classifier_options", "dtype"} <= set(schema["properties"])
    assert schema["properties"]["images_per_prompt"]["maximum"] == 64
    resolution, = (s for s in schema["properties"]["resolution"]["anyOf"] if s.get("type") == "integer")
    assert resolution == {"type": "integer", "minimum": 8, "maximum": 2048, "multipleOf": 8}


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
