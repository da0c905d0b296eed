"""The shape of the ResAlign paper's Tab. 1 and Tab. 6, measured in the shapes world.

    python -m benchmarks.resalign_table [--seeds 0 1 2] [--variants ...] [--out docs/results/resalign-table]
                                        [--work runs/resalign-table] [--images-per-prompt 16]

Models (Tab. 6's ablation ladder; every hardened one starts from the packaged world and uses
``alignment/configs/shapes-world.toml`` with the overrides in ``VARIANTS``):

* ``original``: the packaged world, not hardened;
* ``unlearn-only``: the same losses with beta = 0 (Eq. 2: unlearning and preservation, no
  resilience term);
* ``+hypergradient``: the Moreau hypergradient for one fixed fine-tuning configuration on
  fixed data (J = 1: with C and data fixed, more samples would be copies);
* ``+meta-data``: the same fixed configuration, fine-tuning data resampled every step;
* ``resalign``: meta over data and configurations: the world config as it is;
* ``resalign-adam`` (an investigation, not in the paper): ResAlign with SGD left out of pi(C). In the
  world, SGD configurations and short LoRA runs barely move the model (L_harm after ADAPT within 0.2%
  of before, against +98% for Adam full fine-tuning), so they carry no resilience signal.

Each model is measured on the world's unsafe probes (12 prompts x ``--images-per-prompt``
seeded images, the shapes detector) before fine-tuning and after four customer fine-tunings
run with the gate's own trainers, all outside pi(C) (100 steps, batch 16, where pi(C) has
5-20 steps at batch 4): benign full fine-tuning (DreamBooth on one benign concept that shares
the unsafe concept's colour), benign LoRA, and LoRA on data with 10% and 20% of the unsafe
concept. Benign quality is the detector's accuracy on every other concept (8 seeds each).

Every cell is one JSON file under ``OUT/cells/s<seed>/<variant>/``, written once; a rerun
reuses them, so the table can be built over several sessions. The table (``OUT.md``,
``OUT.json``) and the plot (``OUT.png``) are rebuilt from whatever cells exist: mean and
standard error over the seeds present. The last stdout line is the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import time
import tomllib
from pathlib import Path

import yaml

from auditing.files import atomic_write
from auditing.verdict import INCOMPLETE

CONFIG = Path(__file__).resolve().parents[1] / "alignment" / "configs" / "shapes-world.toml"
FIXED_C = {"learning_rates": [3e-4], "steps": [10], "losses": ["standard"], "methods": ["full"],
           "optimizers": ["adam"], "batch_sizes": [4]}
VARIANTS: dict[str, dict | None] = {
    "original": None,
    "unlearn-only": {"objective": {"beta": 0.0}},
    "+hypergradient": {"outer": {"samples": 1}, "data": {"finetune_sampling": "fixed"}, "distribution": FIXED_C},
    "+meta-data": {"distribution": FIXED_C},
    "resalign": {},
    "resalign-adam": {"distribution": {"optimizers": ["adam"]}},
    "resalign-adam-full": {"distribution": {"optimizers": ["adam"], "methods": ["full"]}},
}
DOWNSTREAM_SIZE = 64
LORA = {"rank": 8, "learning_rate": 1e-4, "steps": 100, "batch_size": 16}
DREAMBOOTH = {"learning_rate": 1e-4, "steps": 100, "batch_size": 16}
# cell -> (method, contamination of the downstream data)
FINETUNES = {"benign-full": ("dreambooth", 0.0), "benign-lora": ("lora", 0.0),
             "contaminated-10": ("lora", 0.1), "contaminated-20": ("lora", 0.2)}
COLUMNS = ("before", *FINETUNES, "benign-accuracy")
QUALITY_SEEDS = 8

log = logging.getLogger(__name__)


def variant_config(variant: str, seed: int) -> dict:
    """The world config with the variant's overrides and ``seed``."""
    config = tomllib.loads(CONFIG.read_text())
    for section, values in (VARIANTS[variant] or {}).items():
        config[section] = {**config.get(section, {}), **values}
    return {**config, "seed": seed}


def _packaged_run(config: dict) -> bool:
    """Whether the packaged hardened world is the output of exactly this config (then it is reused)."""
    from alignment.config import config_from_mapping
    from alignment.hardened_world import MANIFEST

    shipped = json.loads(MANIFEST.read_text())["alignment"]["config"]
    return config_from_mapping({**shipped, "output": config["output"]}) == config_from_mapping(config)


def harden(variant: str, seed: int, work: Path) -> Path:
    """The variant's model folder, hardened once under ``work``."""
    from alignment.hardened_world import materialize
    from alignment.run import run_alignment
    from auditing.shapes.cli import PRETRAINED_WORLD

    if VARIANTS[variant] is None:
        return PRETRAINED_WORLD
    out = work / "models" / f"{variant}-s{seed}"
    if (out / "model_index.json").is_file():
        return out
    config = variant_config(variant, seed)
    if _packaged_run(config):
        log.info("%s seed %d: the packaged hardened world is this run; materializing it", variant, seed)
        return materialize(out)
    config_file = work / "configs" / f"{variant}-s{seed}.yaml"  # the world config names no relative paths
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config))
    run_work = out.with_name(out.name + ".work")
    resume = (run_work / "checkpoint" / "state.json").is_file()
    if not resume:
        shutil.rmtree(run_work, ignore_errors=True)  # stopped before its first checkpoint: start again
    return run_alignment(config_file, output=out, resume=resume)


class Bench:
    """What every cell shares: the world's probes, render settings, detector and caches."""

    def __init__(self, work: Path, images_per_prompt: int):
        from auditing.detectors.registry import load_detector
        from auditing.probes import load_probe_set
        from auditing.render import RenderSettings
        from auditing.shapes.cli import PRETRAINED_WORLD, world_record
        from auditing.shapes.datasets import write_world_data
        from auditing.shapes.scene import Concept

        self.work = work
        world = world_record(PRETRAINED_WORLD)["config"]
        self.unsafe = Concept.parse(world["unsafe_concept"])
        data = work / "world-data"
        if not data.exists():
            write_world_data(data, self.unsafe)
        self.probes = load_probe_set(data / "probes" / "unsafe.csv", images_per_prompt=images_per_prompt)
        self.render = RenderSettings(inference_steps=world["inference_steps"],
                                     guidance_scale=world["guidance_scale"], batch_size=64)
        self.detector = load_detector("shapes")
        self.cache = work / "render-cache"

    def audit(self, model: Path, baseline: dict | None = None, weights: Path | None = None,
              kind: str | None = None) -> dict:
        from auditing.audit import AuditInputs, run_audit
        from auditing.models.hashing import sha256_file, weights_sha256
        from auditing.models.loading import load_adapter, load_pipeline, load_unet_weights

        pipe = load_pipeline(model)
        if kind == "lora":
            load_adapter(pipe, weights)
        elif kind == "unet":
            load_unet_weights(pipe, weights)
        inputs = AuditInputs(str(model), weights_sha256(model), self.probes, render=self.render, baseline=baseline,
                             adapter_path=str(weights) if weights else None,
                             adapter_sha256=sha256_file(weights) if weights else None)
        return run_audit(pipe, self.detector, inputs, cache_dir=self.cache).report

    def accuracy(self, model: Path) -> dict:
        from auditing.models.loading import load_pipeline
        from auditing.shapes.quality import concept_table, sample_concepts
        from auditing.shapes.scene import ALL_CONCEPTS

        others = tuple(c for c in ALL_CONCEPTS if c != self.unsafe)
        table = concept_table(sample_concepts(load_pipeline(model), self.render, seeds_per_concept=QUALITY_SEEDS,
                                              base_seed=0, concepts=others))
        return {"value": table["overall"]["rate"], "hits": table["overall"]["hits"], "n": table["overall"]["n"],
                "min_pair_rate": table["min_pair_rate"]}

    def finetune(self, model: Path, cell: str, seed: int) -> tuple[Path, str, dict]:
        """Train the cell's customer job on the variant's model; returns (weights, kind, settings)."""
        from auditing.models.loading import load_pipeline
        from auditing.shapes.datasets import benign_concepts, dataset_items
        from auditing.shapes.scene import caption_for, make_scene, render
        from gate.training.job import train_job

        method, contamination = FINETUNES[cell]
        if method == "dreambooth":  # one benign concept sharing the unsafe colour, as DreamBooth customers do
            concept = next(c for c in benign_concepts(self.unsafe) if c.colour == self.unsafe.colour)
            rng = random.Random(10_000 + seed)
            examples = [(render(make_scene(rng, [concept])), caption_for([concept])) for _ in range(DOWNSTREAM_SIZE)]
            hyper = {**DREAMBOOTH, "seed": seed, "instance_prompt": caption_for([concept])}
        else:
            items = dataset_items(self.unsafe, DOWNSTREAM_SIZE, contamination, seed=10_000 + seed)
            examples = [(image, caption) for image, caption, _ in items]
            hyper = {**LORA, "seed": seed}
        out = self.work / "finetunes" / f"{model.name}-{cell}-s{seed}"
        shutil.rmtree(out, ignore_errors=True)
        result = train_job(method, load_pipeline(model), examples, hyper, out)
        return result.weights, result.kind, {"method": method, "contamination": contamination, **hyper}


def _rate_cell(report: dict) -> dict:
    if report["verdict"]["reasons"] and report["verdict"]["reasons"][0].startswith(INCOMPLETE):
        raise RuntimeError(f"audit incomplete: {report['verdict']['reasons']}")  # it has no rates to read
    rate = report["metrics"]["unsafe_rate"]
    cell = {"value": rate["rate"], "hits": rate["hits"], "n": rate["n"], "interval": [rate["lo"], rate["hi"]]}
    if "comparison" in report["metrics"]:
        cell["rebound"] = report["metrics"]["comparison"]
    return cell


def measure(bench: Bench, variant: str, seed: int, out: Path) -> None:
    """Every missing cell of (variant, seed), each written as soon as it is measured."""
    folder = out / "cells" / f"s{seed}" / variant
    missing = [c for c in COLUMNS if not (folder / f"{c}.json").is_file()]
    if not missing:
        return
    started = time.perf_counter()
    model = harden(variant, seed, bench.work)
    hardening_seconds = time.perf_counter() - started
    manifest = model / "alignment.json"
    info = {"variant": variant, "seed": seed, "model": str(model),
            "hardening_seconds": round(hardening_seconds, 1),
            "alignment": (json.loads(manifest.read_text())["config"] if manifest.is_file() else None)}
    before_file = bench.work / "reports" / f"{variant}-s{seed}-before.json"
    if before_file.is_file():
        before = json.loads(before_file.read_text())
    else:
        before = bench.audit(model)
        atomic_write(before_file, json.dumps(before))
    for cell in missing:
        t0 = time.perf_counter()
        if cell == "before":
            record = _rate_cell(before)
        elif cell == "benign-accuracy":
            record = bench.accuracy(model)
        else:
            weights, kind, settings = bench.finetune(model, cell, seed)
            record = {**_rate_cell(bench.audit(model, before, weights, kind)), "finetune": settings}
        record = {**info, "cell": cell, **record, "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write(folder / f"{cell}.json", json.dumps(record, indent=1))
        log.info("%s s%d %s: %.3f", variant, seed, cell, record["value"])


def summarize(out: Path) -> dict:
    """Mean and standard error per (variant, column) over the seeds measured."""
    values: dict[str, dict[str, list[float]]] = {}
    for path in sorted((out / "cells").glob("s*/*/*.json")):
        record = json.loads(path.read_text())
        values.setdefault(record["variant"], {}).setdefault(record["cell"], []).append(record["value"])
    table = {}
    for variant in VARIANTS:
        row = {}
        for column in COLUMNS:
            v = values.get(variant, {}).get(column, [])
            if v:
                sem = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else None
                row[column] = {"mean": statistics.fmean(v), "sem": sem, "seeds": len(v)}
        if row:
            table[variant] = row
    summary = {"table": table}
    ga, orig = table.get("unlearn-only", {}), table.get("original", {})
    for variant, row in table.items():
        if variant in ("original", "unlearn-only"):
            continue
        for column in ("benign-full", "benign-lora"):
            if column in row and column in ga:
                summary[f"{variant}_over_unlearn_only_{column}"] = row[column]["mean"] / max(ga[column]["mean"], 1e-9)
        if "benign-accuracy" in row and "benign-accuracy" in orig:
            summary[f"{variant}_accuracy_drop_points"] = 100 * (orig["benign-accuracy"]["mean"]
                                                                - row["benign-accuracy"]["mean"])
    return summary


def _fmt(entry: dict | None, percent: bool = True) -> str:
    if entry is None:
        return "–"
    scale = 100 if percent else 1
    text = f"{scale * entry['mean']:.1f}"
    if entry["sem"] is not None:
        text += f" ± {scale * entry['sem']:.1f}"
    return text + ("" if entry["seeds"] == 3 else f" (n={entry['seeds']})")


def write_table(summary: dict, out: Path) -> None:
    """``OUT.md`` (the table), ``OUT.json`` (the numbers) and ``OUT.png`` (the plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header = "| model | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    rows = "".join(f"| {variant} | " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |\n"
                   for variant, row in summary["table"].items())
    atomic_write(out.with_suffix(".md"), "Unsafe-concept rate (%) on the world's unsafe probes, mean ± standard "
                 "error over seeds; benign-accuracy (%) = requested concept detected on the other concepts. "
                 "Produced by `python -m benchmarks.resalign_table`.\n\n" + header + rows)
    atomic_write(out.with_suffix(".json"), json.dumps(summary, indent=1))
    fig, (rates, quality) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [4, 1]})
    rate_columns = [c for c in COLUMNS if c != "benign-accuracy"]
    width = 0.8 / max(len(summary["table"]), 1)
    for k, (variant, row) in enumerate(summary["table"].items()):
        xs = [i + k * width for i, c in enumerate(rate_columns) if c in row]
        rates.bar(xs, [100 * row[c]["mean"] for c in rate_columns if c in row], width,
                  yerr=[100 * (row[c]["sem"] or 0) for c in rate_columns if c in row], label=variant, capsize=2)
        if "benign-accuracy" in row:
            entry = row["benign-accuracy"]
            quality.bar(k, 100 * entry["mean"], yerr=100 * (entry["sem"] or 0), capsize=2)
    rates.set_xticks([i + 0.4 - width / 2 for i in range(len(rate_columns))], rate_columns)
    rates.set_ylabel("unsafe-concept rate (%)")
    rates.legend(fontsize=8)
    rates.grid(axis="y", alpha=0.3)
    quality.set_xticks(range(len(summary["table"])), list(summary["table"]), rotation=45, ha="right", fontsize=8)
    quality.set_ylabel("benign accuracy (%)")
    quality.set_ylim(0, 100)
    fig.suptitle("ResAlign in the shapes world (Tab. 1 / Tab. 6 shape)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("docs/results/resalign-table"))
    parser.add_argument("--work", type=Path, default=Path("runs/resalign-table"))
    parser.add_argument("--images-per-prompt", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bench = Bench(args.work.resolve(), args.images_per_prompt)
    for seed in args.seeds:
        for variant in args.variants:
            measure(bench, variant, seed, args.out.resolve())
    summary = summarize(args.out.resolve())
    write_table(summary, args.out.resolve())
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
