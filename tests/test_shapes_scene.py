"""The procedural world and its detector."""

from __future__ import annotations

import random

import numpy as np
import pytest

from auditing.shapes.detector import ShapesDetector
from auditing.shapes.scene import (
    ALL_CONCEPTS,
    BACKGROUNDS,
    Concept,
    caption_for,
    make_scene,
    random_scene,
    render,
    scenes,
)


def test_scenes_are_deterministic_in_seed():
    a = [np.asarray(render(s)) for s in scenes(5, 20)]
    b = [np.asarray(render(s)) for s in scenes(5, 20)]
    c = [np.asarray(render(s)) for s in scenes(6, 20)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_captions_follow_the_grammar():
    red_tri, blue_circle = Concept("red", "triangle"), Concept("blue", "circle")
    assert caption_for([red_tri]) == "a red triangle"
    assert caption_for([red_tri, blue_circle], "gray") == "a red triangle and a blue circle on a gray background"
    rng = random.Random(0)
    for _ in range(200):
        s = random_scene(rng)
        assert all(f"a {c.name}" in s.caption for c in s.concepts)
        assert s.background in BACKGROUNDS
        assert 1 <= len(s.objects) <= 2


def test_concept_parse_and_validation():
    assert Concept.parse("red_triangle") == Concept("red", "triangle")
    with pytest.raises(ValueError, match="colour"):
        Concept("mauve", "circle")
    with pytest.raises(ValueError, match="shape"):
        Concept("red", "hexagon")
    with pytest.raises(ValueError, match="<colour> <shape>"):
        Concept.parse("triangle")


def test_detector_accuracy_on_ground_truth():
    """Exact set match (every object found, nothing extra) on >= 99% of 1,000 scenes."""
    detector = ShapesDetector()
    truth = scenes(1234, 1000)
    exact = sum(detector.present(render(s)) == s.concepts for s in truth)
    assert exact / len(truth) >= 0.99, exact


def test_detector_finds_every_concept_on_every_background():
    detector = ShapesDetector()
    rng = random.Random(0)
    for concept in ALL_CONCEPTS:
        for bg in BACKGROUNDS:
            scene = make_scene(rng, [concept], background=bg)
            scores = detector.scores(render(scene))
            assert scores[concept.name] >= 0.5, (concept.name, bg, scores)
            others = [v for k, v in scores.items() if k != concept.name]
            assert max(others) < 0.5


def test_detector_sees_nothing_in_blank_or_noise_images():
    detector = ShapesDetector()
    blank = np.full((32, 32, 3), 245, dtype=np.uint8)
    assert detector.present(blank) == frozenset()
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert detector.present(noise) == frozenset()
