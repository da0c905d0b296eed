"""An audit's deadline grows with the images it can render, is clamped to its ceiling, and lies under the audit
task's Celery time limits (gate.pipeline.audit.audit_deadline, gate.worker.app.time_limits)."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import pytest

from auditing.job_probes import JobTexts, zero_hit_images
from auditing.model_check import ModelCheckSettings
from auditing.verdict import VerdictPolicy
from gate.pipeline.audit import audit_deadline, audit_images
from gate.pipeline.profile import AuditProfile
from gate.settings import Settings, SettingsError
from gate.worker.app import AUDIT_TASK_MARGIN_S, make_celery, time_limits

POLICY = VerdictPolicy()
CAPTIONS = JobTexts(("a blue square",) * 4)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(state_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'db'}", broker_url="redis://localhost:1/0",
                    artifacts_dir=tmp_path / "artifacts")


@pytest.fixture
def profile(tmp_path) -> AuditProfile:
    probes = tmp_path / "probes.csv"
    probes.write_text("prompt\na red triangle\na blue circle\n")
    return AuditProfile(probes=str(probes), detector="shapes", inference_steps=10)


def test_the_image_count_covers_every_family_at_every_scale_and_the_model_check(profile, tmp_path):
    family = zero_hit_images(POLICY)
    one = audit_images(profile, POLICY, [1.0], CAPTIONS, 2, None)
    assert one == (2 + family + 2) + (family + 2)  # profile, captions, triggers; the base renders the families
    assert audit_images(profile, POLICY, [1.0, 2.0], CAPTIONS, 2, None) == one + 2 + family + 2
    assert audit_images(profile, POLICY, [1.0], CAPTIONS, 20, None) > one
    assert audit_images(profile, POLICY, [1.0], JobTexts(()), 2, None) == 2  # no texts: the profile's probes only
    pool = tmp_path / "pool.csv"
    pool.write_text("prompt\nx\ny\nz\n")
    assert audit_images(replace(profile, secret_pool=str(pool)), POLICY, [1.0], CAPTIONS, 2, None) == one + 4
    assert audit_images(replace(profile, family_images=family + 5), POLICY, [1.0], CAPTIONS, 2, None) == one + 10
    # The check: 2 models x 6 prompts ("", the caption, up to 4 triggers) x 8 images (4 references, 4 controls)
    # x 2 timesteps UNet passes, at 2 passes a step of 10 steps an image.
    check = ModelCheckSettings(images=4, timesteps=(100, 200))
    assert audit_images(profile, POLICY, [1.0], CAPTIONS, 2, (check, None, None)) == one + 10  # ceil(192 / 20)


def test_the_deadline_grows_with_the_images(settings):
    small, large = audit_deadline(settings, 10), audit_deadline(settings, 1000)
    assert small["seconds"] == settings.audit_deadline_base_seconds + 10 * settings.audit_seconds_per_image
    assert large["seconds"] - small["seconds"] == pytest.approx(990 * settings.audit_seconds_per_image)
    assert large["images"] == 1000 and not large["clamped"]


def test_a_deadline_above_the_ceiling_is_clamped_with_a_clear_warning(settings, caplog):
    with caplog.at_level(logging.WARNING, logger="gate.pipeline.audit"):
        limit = audit_deadline(settings, 100_000)
    assert limit["clamped"] and limit["seconds"] == settings.audit_deadline_seconds < limit["computed_seconds"]
    assert "audit_deadline_seconds = 18000" in caplog.text and "clamped" in caplog.text


def test_the_audit_task_time_limits_lie_above_the_ceiling(settings):
    for ceiling in (settings.audit_deadline_seconds, 20 * 3600):
        configured = replace(settings, audit_deadline_seconds=ceiling)
        hard, soft = time_limits(configured)["gate.audit"]
        assert ceiling < soft < hard == ceiling + AUDIT_TASK_MARGIN_S
        app = make_celery(configured)
        assert app.conf.task_annotations["gate.audit"] == {"time_limit": hard, "soft_time_limit": soft}
        assert app.conf.broker_transport_options["visibility_timeout"] > hard
    assert time_limits(settings)["gate.train"] == (12 * 3600, int(12 * 3600 * 0.9))


@pytest.mark.parametrize("field,value,message", [
    ("audit_seconds_per_image", 0, "audit_seconds_per_image must be greater than or equal to 0.001 (got 0)"),
    ("audit_seconds_per_image", 3601.0, "audit_seconds_per_image must be less than or equal to 3600 (got 3601.0)"),
    ("audit_deadline_base_seconds", -1, "audit_deadline_base_seconds must be greater than or equal to 0 (got -1)"),
    ("audit_deadline_seconds", 25 * 3600, "audit_deadline_seconds must be less than or equal to 86400 (got 90000)"),
    ("audit_deadline_seconds", True, "audit_deadline_seconds must be a valid integer (got True)"),
])
def test_deadline_settings_out_of_range_are_refused_naming_the_field(settings, field, value, message):
    with pytest.raises(SettingsError, match=re.escape(message)) as caught:
        replace(settings, **{field: value})
    assert caught.value.field == field
