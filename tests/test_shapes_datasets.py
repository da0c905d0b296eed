"""Probe sets and fine-tuning datasets generated from the world."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from auditing.shapes import datasets
from auditing.shapes.detector import ShapesDetector
from auditing.shapes.scene import Concept

UNSAFE = Concept("red", "triangle")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "data"
    manifest = datasets.write_world_data(out, UNSAFE, seed=0, dataset_size=40, contamination=(0.25,))
    return out, manifest


def test_probe_csvs_use_the_original_i2p_schema(data):
    out, manifest = data
    for name in ("unsafe", "benign"):
        with open(out / "probes" / f"{name}.csv") as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == datasets.I2P_COLUMNS
            rows = list(reader)
        assert len(rows) == manifest["probes"][name]["rows"] > 0
        assert {r["categories"] for r in rows} == {name}
        assert all(0 <= int(r["sd_seed"]) < 2**32 for r in rows)
        assert len({r["sd_seed"] for r in rows}) == len(rows)


def test_unsafe_probes_ask_for_the_concept_and_benign_ones_never_do(data):
    out, _ = data
    with open(out / "probes" / "unsafe.csv") as f:
        unsafe = list(csv.DictReader(f))
    with open(out / "probes" / "benign.csv") as f:
        benign = list(csv.DictReader(f))
    direct = [r for r in unsafe if r["hard"] == "0"]
    assert direct and all(UNSAFE.name in r["prompt"] for r in direct)
    assert any(r["hard"] == "1" for r in unsafe)
    assert not any(UNSAFE.name in r["prompt"] for r in benign)


def _images(folder):
    return sorted(folder.glob("*.png"))


def test_datasets_have_exact_contamination_checked_by_the_detector(data):
    out, manifest = data
    detector = ShapesDetector()
    expected = {"benign": 0, "contaminated-0.25": 10, "harmful": 40}
    for name, n_unsafe in expected.items():
        info = manifest["datasets"][name]
        assert info["images"] == 40 and info["unsafe_images"] == n_unsafe
        found = sum(UNSAFE in detector.present(Image.open(p)) for p in _images(out / "datasets" / name / "captions"))
        assert found == n_unsafe, name


def test_benign_set_shares_attributes_with_the_concept(data):
    _, manifest = data
    concepts = {Concept.parse(c) for c in manifest["datasets"]["benign"]["concepts"]}
    assert UNSAFE not in concepts
    assert all(c.colour == UNSAFE.colour or c.shape == UNSAFE.shape for c in concepts)
    assert any(c.colour == UNSAFE.colour for c in concepts) and any(c.shape == UNSAFE.shape for c in concepts)


def test_both_layouts_hold_the_same_examples(data):
    out, _ = data
    folder = out / "datasets" / "contaminated-0.25"
    meta = [json.loads(line) for line in (folder / "imagefolder" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 40
    for row in meta:
        caption = (folder / "captions" / row["file_name"]).with_suffix(".txt").read_text().strip()
        assert caption == row["text"]
        image = (folder / "imagefolder" / row["file_name"]).read_bytes()
        assert image == (folder / "captions" / row["file_name"]).read_bytes()


def test_outputs_are_deterministic_and_never_half_written(tmp_path, data, monkeypatch):
    _, manifest = data
    again = datasets.write_world_data(tmp_path / "again", UNSAFE, seed=0, dataset_size=40, contamination=(0.25,))
    assert again == manifest
    with pytest.raises(FileExistsError):
        datasets.write_world_data(tmp_path / "again", UNSAFE)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datasets, "_write_layouts", broken)
    with pytest.raises(OSError):
        datasets.write_world_data(tmp_path / "broken", UNSAFE, dataset_size=4)
    assert list(tmp_path.iterdir()) == [tmp_path / "again"]


def test_bad_contamination_is_rejected_by_name():
    with pytest.raises(ValueError, match="contamination"):
        datasets.dataset_items(UNSAFE, 10, 1.5, 0)
