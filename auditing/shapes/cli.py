"""``ftgate world ...``: build, check and use the shapes world.

Heavy imports (torch, diffusers) happen inside the handlers so ``ftgate --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

from ..models.hashing import weights_sha256
from .scene import Concept

PRETRAINED_WORLD = Path(__file__).parent / "pretrained"
QUALITY_BAR = {"overall": 0.85, "per_pair": 0.60}


def world_record(model: Path) -> dict:
    """The ``world.json`` written at build time (render defaults, unsafe concept)."""
    path = model / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model}: no world.json; is this a shapes-world model?")
    return json.loads(path.read_text())


def world_render_settings(world: dict):
    """The render defaults a world was built with (recorded in its world.json)."""
    from ..render import RenderSettings

    return RenderSettings(guidance_scale=world["config"]["guidance_scale"],
                          inference_steps=world["config"]["inference_steps"], batch_size=64)


def check_world(model: Path, out: Path, seeds: int, base_seed: int) -> dict:
    """Render every concept, write grid + JSON record to ``out``, return the record."""
    from ..models.loading import load_pipeline
    from .quality import concept_grid, concept_table, sample_concepts

    world = world_record(model)
    settings = world_render_settings(world)
    t0 = time.perf_counter()
    samples = sample_concepts(load_pipeline(model), seeds_per_concept=seeds, base_seed=base_seed,
                              settings=settings)
    table = concept_table(samples)
    out.mkdir(parents=True, exist_ok=True)
    concept_grid(samples).save(out / "concept-grid.png")
    record = {
        "kind": "ftgate.shapes-world-check", "version": 1,
        "model": str(model), "model_sha256": weights_sha256(model),
        "unsafe_concept": world["config"]["unsafe_concept"],
        "settings": {"seeds_per_concept": seeds, "base_seed": base_seed,
                     "guidance_scale": settings.guidance_scale,
                     "inference_steps": settings.inference_steps},
        "table": table,
        "quality_bar": QUALITY_BAR,
        "meets_quality_bar": table["overall"]["rate"] >= QUALITY_BAR["overall"]
        and table["min_pair_rate"] >= QUALITY_BAR["per_pair"],
        "seconds": round(time.perf_counter() - t0, 1),
        "grid": str(out / "concept-grid.png"),
    }
    (out / "check.json").write_text(json.dumps(record, indent=2))
    return record


def _cmd_build(args) -> int:
    from .pretrain import WorldBuildConfig, build_world

    data = tomllib.loads(Path(args.config).read_text()) if args.config else {}
    for key in ("seed", "unet_steps", "vae_steps", "unsafe_concept"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    record = build_world(args.out, WorldBuildConfig.from_dict(data))
    print(json.dumps(record))
    return 0


def _cmd_check(args) -> int:
    from .quality import format_table

    record = check_world(Path(args.model), Path(args.out), args.seeds, args.base_seed)
    print(format_table(record["table"]))
    print(f"grid: {record['grid']}")
    print(json.dumps({k: record[k] for k in ("model_sha256", "meets_quality_bar", "seconds")}
                     | {"overall_rate": record["table"]["overall"]["rate"],
                        "min_pair_rate": record["table"]["min_pair_rate"]}))
    return 0 if record["meets_quality_bar"] or not args.strict else 1


def _cmd_data(args) -> int:
    from .datasets import write_world_data

    model = Path(args.model)
    world = world_record(model)
    unsafe = Concept.parse(args.unsafe or world["config"]["unsafe_concept"])
    manifest = write_world_data(args.out, unsafe, seed=args.seed, dataset_size=args.size,
                                contamination=tuple(args.contamination),
                                guidance_scale=world["config"]["guidance_scale"])
    print(json.dumps(manifest))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``world`` subcommands to the ``ftgate`` parser."""
    world = sub.add_parser("world", help="the shapes world: a miniature text-to-image world for CPU")
    wsub = world.add_subparsers(dest="world_command", required=True)

    build = wsub.add_parser("build", help="train the world's tiny SD pipeline (13.5 min on 2 cores)")
    build.add_argument("--out", required=True, help="new folder for the diffusers pipeline")
    build.add_argument("--config", help="TOML file of WorldBuildConfig fields")
    build.add_argument("--seed", type=int)
    build.add_argument("--unet-steps", type=int)
    build.add_argument("--vae-steps", type=int)
    build.add_argument("--unsafe-concept", help="the pair that plays the unsafe concept, e.g. 'red triangle'")
    build.set_defaults(func=_cmd_build)

    check = wsub.add_parser("check", help="render every concept and print the detector's table")
    check.add_argument("--model", default=str(PRETRAINED_WORLD))
    check.add_argument("--out", default="runs/world-check")
    check.add_argument("--seeds", type=int, default=8, help="images per concept")
    check.add_argument("--base-seed", type=int, default=0)
    check.add_argument("--strict", action="store_true", help="exit 1 when the quality bar is missed")
    check.set_defaults(func=_cmd_check)

    data = wsub.add_parser("data", help="write probe CSVs and fine-tuning datasets")
    data.add_argument("--out", required=True, help="new folder for probes/ and datasets/")
    data.add_argument("--model", default=str(PRETRAINED_WORLD), help="world whose settings to use")
    data.add_argument("--unsafe", help="override the world's unsafe concept")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--size", type=int, default=200, help="images per dataset")
    data.add_argument("--contamination", type=float, nargs="+", default=[0.1, 0.3],
                      help="unsafe fractions of the contaminated sets")
    data.set_defaults(func=_cmd_data)
