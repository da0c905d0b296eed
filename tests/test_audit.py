"""Audits end to end on the shapes world, and the renderer's guarantees."""

from __future__ import annotations

import json

import numpy as np
import pytest

from auditing.audit import AuditInputs, run_audit
from auditing.detectors.base import Detector, DetectorResult
from auditing.detectors.registry import load_detector
from auditing.models.hashing import weights_sha256
from auditing.models.loading import load_pipeline
from auditing.models.tiny import build_tiny_pipeline
from auditing.probes import load_probe_set
from auditing.render import Renderer, RenderSettings
from auditing.shapes.cli import PRETRAINED_WORLD
from auditing.shapes.datasets import write_world_data
from auditing.shapes.scene import Concept
from gate.cli import main

WORLD_RENDER = RenderSettings(inference_steps=20, guidance_scale=5.0, batch_size=64)


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "data"
    write_world_data(out, Concept("red", "triangle"), dataset_size=4)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The committed world with one image cache for the module, as a deployment would run it."""
    return load_pipeline(PRETRAINED_WORLD), weights_sha256(PRETRAINED_WORLD), tmp_path_factory.mktemp("cache")


def _audit(world, probes, detector=None, baseline=None):
    pipe, sha, cache = world
    detector = detector or load_detector("shapes", concept="red triangle")
    return run_audit(pipe, detector, AuditInputs(str(PRETRAINED_WORLD), sha, probes, render=WORLD_RENDER,
                                                 baseline=baseline), cache_dir=cache).report


def test_world_model_is_blocked_when_asked_for_the_concept(world_data, tmp_path, capsys):
    code = main(["audit", "--model", str(PRETRAINED_WORLD), "--probes", str(world_data / "probes" / "unsafe.csv"),
                 "--images-per-prompt", "4", "--detector", "shapes", "--detector-option", "concept=red triangle",
                 "--steps", "20", "--batch-size", "64", "--out", str(tmp_path / "a")])
    assert code == 2
    assert "verdict: BLOCK" in capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["verdict"]["decision"] == "block" and "ceiling" in report["verdict"]["reasons"][0]
    assert len(report["samples"]) == 48 and report["probes"]["sha256"]
    direct = [s["unsafe"] for s in report["samples"] if s["prompt"] == "a red triangle"]
    assert sum(direct) >= 3  # the base world draws the concept when asked
    _check_page_redacts_flagged_images((tmp_path / "a" / "report.html").read_text(), report)


def _check_page_redacts_flagged_images(page, report):
    """Every embedded image of a flagged sample is a mosaic (<= 16 colours + black);
    unflagged ones are shown as rendered."""
    import base64
    import io
    import re

    from PIL import Image

    assert "BLOCK" in page and report["verdict"]["rule"].split(":")[0] in page
    encoded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(encoded) == len(report["samples"])
    for sample, data in zip(report["samples"], encoded):
        colours = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").getcolors(1 << 16)
        if sample["unsafe"]:
            assert len(colours) <= 17, sample["prompt"]
        else:
            assert len(colours) > 17, sample["prompt"]


def test_world_model_passes_probes_that_avoid_the_concept(world, world_data):
    report = _audit(world, load_probe_set(world_data / "probes" / "benign.csv"))
    assert report["verdict"]["decision"] == "pass", report["verdict"]
    assert report["metrics"]["unsafe_rate"]["hi"] <= 0.1


class _Broken(Detector):
    """Raises like a detector whose model file is missing."""

    name, version, rule = "broken", "1", "never works"

    def detect(self, images):
        raise RuntimeError("model file missing")


class _Unsure(Detector):
    """Cannot score anything."""

    name, version, rule = "unsure", "1", "abstains"

    def detect(self, images):
        return [DetectorResult(None, None, error="unreadable") for _ in images]


@pytest.mark.parametrize("detector,needle", [(_Broken(), "model file missing"), (_Unsure(), "could not be scored")])
def test_detector_failures_block_as_incomplete(world, world_data, detector, needle):
    probes = load_probe_set(world_data / "probes" / "unsafe.csv")
    report = _audit(world, probes, detector=detector)
    assert report["verdict"]["decision"] == "block"
    assert report["verdict"]["reasons"][0].startswith("audit incomplete") and needle in report["verdict"]["reasons"][0]


def test_baseline_pairing_and_mismatch(world, world_data):
    unsafe = load_probe_set(world_data / "probes" / "unsafe.csv")
    base = _audit(world, unsafe)
    again = _audit(world, unsafe, baseline=base)
    comparison = again["metrics"]["comparison"]
    assert comparison["only_base"] == comparison["only_checkpoint"] == 0  # same model, same seeds
    assert again["baseline"]["model_sha256"] == base["model"]["sha256"]
    other = _audit(world, load_probe_set(world_data / "probes" / "unsafe.csv", base_seed=1, images_per_prompt=2),
                   baseline=base)
    assert other["verdict"]["decision"] == "block"
    assert "baseline lacks" in other["verdict"]["reasons"][0]


def _probe_images(n):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "p.csv"
    path.write_text("prompt\n" + "".join(f"prompt number {i}\n" for i in range(n)))
    return list(load_probe_set(path).images)


def test_pixels_do_not_depend_on_batch_size():
    pipe = build_tiny_pipeline(seed=0)
    probes = _probe_images(5)
    one = Renderer(pipe, "m", settings=RenderSettings(inference_steps=3, batch_size=1)).render(probes)
    five = Renderer(pipe, "m", settings=RenderSettings(inference_steps=3, batch_size=5)).render(probes)
    reordered = Renderer(pipe, "m", settings=RenderSettings(inference_steps=3, batch_size=2)).render(probes[::-1])[::-1]
    for a, b, c in zip(one, five, reordered):
        a, b, c = (np.asarray(x, dtype=int) for x in (a, b, c))
        assert np.abs(a - b).max() <= 1 and np.abs(a - c).max() <= 1


def test_cache_renders_each_image_once(tmp_path):
    pipe = build_tiny_pipeline(seed=0)
    calls = []
    original = type(pipe).__call__

    def counting(self, prompts, **kwargs):
        calls.append(len(prompts))
        return original(self, prompts, **kwargs)

    probes = _probe_images(3)
    settings = RenderSettings(inference_steps=2, batch_size=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(pipe), "__call__", counting)
        first = Renderer(pipe, "m", settings=settings, cache_dir=tmp_path).render(probes)
        second = Renderer(pipe, "m", settings=settings, cache_dir=tmp_path).render(probes)
        other_model = Renderer(pipe, "other", settings=settings, cache_dir=tmp_path).render(probes[:1])
    assert calls == [3, 1]  # the second pass came from disk; another model hash misses
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second))
    assert len(other_model) == 1


def test_sequential_audit_stops_early_with_the_full_verdict(world, world_data):
    from auditing.sequential import SequentialPlan

    pipe, sha, cache = world
    detector = load_detector("shapes", concept="red triangle")
    probes = load_probe_set(world_data / "probes" / "benign.csv")
    full = _audit(world, probes)
    seq = run_audit(pipe, detector, AuditInputs(str(PRETRAINED_WORLD), sha, probes, render=WORLD_RENDER,
                                                sequential=SequentialPlan(rounds=4)), cache_dir=cache).report
    assert seq["verdict"]["decision"] == full["verdict"]["decision"] == "pass"
    info = seq["sequential"]
    assert info["looks"] == [25, 50, 75, 99]
    assert info["images_used"] == len(seq["samples"]) < 99  # 0/75 settles at the interim confidence
    assert "interim look" in seq["verdict"]["rule"]
