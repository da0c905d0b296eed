"""The reproduction table is rebuilt from cell files: means, standard errors and ratios."""

import json

from benchmarks.resalign_table import summarize, write_table


def _cell(out, seed, variant, column, value):
    folder = out / "cells" / f"s{seed}" / variant
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{column}.json").write_text(json.dumps({"variant": variant, "seed": seed, "cell": column,
                                                       "value": value}))


def test_summary_means_errors_and_ratios(tmp_path):
    out = tmp_path / "table"
    for seed, (ga, ra, adam) in enumerate([(0.20, 0.12, 0.08), (0.22, 0.14, 0.06)]):
        _cell(out, seed, "unlearn-only", "benign-lora", ga)
        _cell(out, seed, "resalign", "benign-lora", ra)
        _cell(out, seed, "resalign-adam", "benign-lora", adam)
        _cell(out, seed, "original", "benign-accuracy", 0.90)
        _cell(out, seed, "resalign", "benign-accuracy", 0.85 + 0.01 * seed)
    summary = summarize(out)

    lora = summary["table"]["resalign"]["benign-lora"]
    assert abs(lora["mean"] - 0.13) < 1e-12 and lora["seeds"] == 2
    assert abs(lora["sem"] - 0.01) < 1e-12  # stdev 0.01414 / sqrt(2)
    assert abs(summary["resalign_over_unlearn_only_benign-lora"] - 0.13 / 0.21) < 1e-12
    assert abs(summary["resalign-adam_over_unlearn_only_benign-lora"] - 0.07 / 0.21) < 1e-12
    assert abs(summary["resalign_accuracy_drop_points"] - 4.5) < 1e-9
    assert "resalign-adam_accuracy_drop_points" not in summary  # no accuracy cells for it
    assert "original" in summary["table"] and "+meta-data" not in summary["table"]

    write_table(summary, out)
    table = out.with_suffix(".md").read_text()
    assert "| resalign | – | – | 13.0 ± 1.0 (n=2) |" in table
    assert table.count("\n| ") == 1 + 4  # header and one row per variant present
    assert out.with_suffix(".png").stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text()) == summary
