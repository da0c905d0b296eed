"""Probe-set loading: every schema, seeds, hashing, and errors that name row and column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auditing.probes import ProbeFileError, derived_seed, load_probe_set
from gate.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "probes"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} absent (real probe files live there)")


@needs_shared
def test_real_i2p_sexual_subset_has_931_rows_with_their_own_seeds():
    ps = load_probe_set(SHARED / "i2p-4703.csv", category="sexual")
    assert (ps.schema, ps.rows, ps.selected, len(ps.images)) == ("i2p-renamed", 4703, 931, 931)
    assert load_probe_set(SHARED / "i2p-4703.csv").summary()["empty_prompts"] == 1  # a real quirk of I2P
    assert all(i.guidance_scale is not None and 256 <= i.width <= 512 for i in ps.images)
    assert sum(i.width == i.height == 512 for i in ps.images) == 917  # the rest keep their own sizes
    first = ps.images[0]
    assert "sexual" in first.categories and first.seed != derived_seed(first.prompt, 1, 0, 0)


@needs_shared
@pytest.mark.parametrize("name,schema,rows", [("i2p-sexual-931.csv", "prompt-only", 931),
                                               ("unsafe-200.csv", "unsafe", 200),
                                               # 10,000 lines, but 30 captions hold a quoted
                                               # line break: 9,969 records.
                                               ("coco-10k.csv", "coco", 9969)])
def test_real_probe_files_load_in_each_schema(name, schema, rows):
    ps = load_probe_set(SHARED / name, images_per_prompt=3)
    assert (ps.schema, ps.rows, ps.selected, len(ps.images)) == (schema, rows, rows, 3 * rows)
    assert len({(i.probe_id, i.image_index) for i in ps.images}) == 3 * rows


def _write(path, text):
    path.write_text(text)
    return path


def test_original_i2p_schema_and_seed_rules(tmp_path):
    f = _write(tmp_path / "p.csv",
               "prompt,categories,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height\n"
               '"a red triangle","unsafe",42,7,32,32\n"a blue circle","benign",43,7,32,32\n')
    ps = load_probe_set(f, category="unsafe", images_per_prompt=2, base_seed=9)
    assert ps.schema == "i2p" and ps.selected == 1
    assert ps.images[0].seed == 42  # the file's own seed for the first image
    assert ps.images[1].seed == derived_seed("a red triangle", 1, 1, 9)
    assert load_probe_set(f, category="unsafe", images_per_prompt=2, base_seed=9).sha256 == ps.sha256
    assert load_probe_set(f, category="unsafe", images_per_prompt=2, base_seed=10).sha256 != ps.sha256


def test_prompt_only_seeds_are_derived_and_stable(tmp_path):
    f = _write(tmp_path / "p.csv", "prompt\nfirst\nsecond\n")
    a = load_probe_set(f, images_per_prompt=2)
    assert [i.seed for i in a.images] == [derived_seed(p, r, k, 0) for p, r in (("first", 1), ("second", 2))
                                          for k in range(2)]
    assert len({i.seed for i in a.images}) == 4


@pytest.mark.parametrize("body,message", [
    ("prompt,sd_seed,categories,sd_guidance_scale,sd_image_width,sd_image_height\n"
     "ok,12,x,7,512,512\nbad,twelve,x,7,512,512\n", "row 2, column 'sd_seed'"),
    ("prompt,sd_seed,categories,sd_guidance_scale,sd_image_width,sd_image_height\n"
     "ok,-1,x,7,512,512\n", "row 1, column 'sd_seed'"),
    ("text,seed\na,1\n", "matches no known probe schema"),
    ("prompt_index,prompt\n1,a,extra\n", "row 1 has 3 columns"),
])
def test_malformed_files_name_row_and_column(tmp_path, body, message):
    with pytest.raises(ProbeFileError, match=message):
        load_probe_set(_write(tmp_path / "p.csv", body))


def test_category_filter_needs_a_categories_column(tmp_path):
    with pytest.raises(ProbeFileError, match="no 'categories' column"):
        load_probe_set(_write(tmp_path / "p.csv", "prompt\na\n"), category="sexual")


def test_probes_show_prints_a_json_summary_last(tmp_path, capsys):
    f = _write(tmp_path / "p.csv", "prompt_index,prompt\n3,one\n8,two\n")
    assert main(["probes", "show", str(f), "--images-per-prompt", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("rows", "schema", "selected", "images")} == {
        "rows": 2, "schema": "unsafe", "selected": 2, "images": 6}
    assert len(summary["sha256"]) == 64
