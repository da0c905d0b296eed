"""``ftgate probes ...`` and ``ftgate audit``.

``ftgate audit`` exits 0 for pass, 1 for flag, 2 for block (an incomplete audit blocks, and so
does bad input, through the ``ftgate`` entry point).
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

from .detectors.registry import DEFAULT_US_CLASSIFIER, DETECTORS

EXIT_CODES = {"pass": 0, "flag": 1, "block": 2}


def _options(pairs: list[str], flag: str) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"{flag} {pair!r} must be KEY=VALUE")
        options[key] = value
    return options


def _cmd_audit(args) -> int:
    import torch

    from .audit import AuditInputs, run_audit, save_outcome
    from .config import from_mapping
    from .detectors.registry import load_detector
    from .models.hashing import weights_sha256
    from .models.loading import load_adapter, load_pipeline, require_safetensors
    from .probes import load_probe_set
    from .render import RenderSettings
    from .sequential import SequentialPlan
    from .verdict import VerdictPolicy

    policy = VerdictPolicy.from_dict(tomllib.loads(Path(args.policy).read_text())) if args.policy else VerdictPolicy()
    probes = load_probe_set(args.probes, category=args.category, images_per_prompt=args.images_per_prompt,
                            base_seed=args.base_seed)
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    detector = load_detector(args.detector, **_options(args.detector_option, "--detector-option"))
    us_classifier = (None if args.us_classifier == "none" else
                     load_detector(args.us_classifier, **_options(args.us_option, "--us-option")))
    render = from_mapping(RenderSettings, {"inference_steps": args.steps, "guidance_scale": args.guidance,
                                           "batch_size": args.batch_size, "dtype": args.dtype}, "")
    if args.adapter:  # refused before the model is loaded
        require_safetensors(args.adapter, "adapter")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = {"config": args.config, "variant": args.variant, "vae": args.vae}
    model_sha = weights_sha256(args.model, **source)  # the files load_pipeline reads with the same arguments
    pipe = load_pipeline(args.model, torch_dtype=render.torch_dtype, device=device, **source)
    adapter_sha = None
    if args.adapter:
        load_adapter(pipe, args.adapter)
        adapter_sha = weights_sha256(args.adapter)
    inputs = AuditInputs(str(args.model), model_sha, probes, policy, render, baseline,
                         args.adapter, adapter_sha, SequentialPlan(args.rounds) if args.sequential else None)
    outcome = run_audit(pipe, detector, inputs, cache_dir=args.cache, us_classifier=us_classifier)
    report = outcome.report
    path, page = save_outcome(outcome, args.out)
    verdict = report["verdict"]
    ip = report["metrics"].get("unsafe_rate", {}).get("rate")
    us = report["metrics"].get("us_rate", {}).get("rate")
    print(f"report: {path}  page: {page}")
    if "sequential" in report:
        seq = report["sequential"]
        print(f"sequential: stopped at look {seq['stopped_at_look']} of {len(seq['looks'])}, "
              f"{seq['images_used']} of {seq['images_planned']} images rendered")
    rates = f"IP {ip if ip is None else round(ip, 3)}" + ("" if us is None else f", US {round(us, 3)}")
    print(f"verdict: {verdict['decision'].upper()} ({rates}; {'; '.join(verdict['reasons'])})")
    return EXIT_CODES[verdict["decision"]]


def _cmd_probes_show(args) -> int:
    from .probes import load_probe_set

    probe_set = load_probe_set(args.file, category=args.category, images_per_prompt=args.images_per_prompt,
                               base_seed=args.base_seed)
    for image in probe_set.images[: args.head]:
        print(f"{image.probe_id:>8}  seed={image.seed:<10}  {image.prompt[:100]!r}")
    print(json.dumps(probe_set.summary()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``probes`` subcommand to the ``ftgate`` parser."""
    probes = sub.add_parser("probes", help="probe sets (I2P, Unsafe, COCO and prompt-only CSVs)")
    psub = probes.add_subparsers(dest="probes_command", required=True)
    show = psub.add_parser("show", help="resolve a probe file and print its summary as JSON (last line)")
    show.add_argument("file")
    show.add_argument("--category", help="keep rows whose categories contain this, e.g. sexual")
    show.add_argument("--images-per-prompt", type=int, default=1)
    show.add_argument("--base-seed", type=int, default=0, help="for seeds the file does not give")
    show.add_argument("--head", type=int, default=5, help="print the first N resolved images")
    show.set_defaults(func=_cmd_probes_show)

    audit = sub.add_parser("audit", help="render probes with a model, score them, judge (exit 0 pass, 1 flag, 2 block)")
    audit.add_argument("--model", required=True, help="local diffusers folder, or a single .safetensors checkpoint")
    audit.add_argument("--config", help="for a single-file --model: a local diffusers folder of the same architecture")
    audit.add_argument("--variant", help="load the folder's *.VARIANT.safetensors weights, e.g. fp16")
    audit.add_argument("--vae", help="a local AutoencoderKL folder used in place of the model's VAE (fp16-fix VAE)")
    audit.add_argument("--adapter", help="LoRA .safetensors (diffusers/peft or kohya keys) applied to the model")
    audit.add_argument("--probes", required=True, help="probe CSV (any supported schema)")
    audit.add_argument("--category", help="keep rows whose categories contain this")
    audit.add_argument("--images-per-prompt", type=int, default=1)
    audit.add_argument("--base-seed", type=int, default=0)
    audit.add_argument("--detector", default="nudenet",
                       help=f"the IP detector, which the policy judges: one of {', '.join(sorted(DETECTORS))}")
    audit.add_argument("--detector-option", action="append", default=[], metavar="KEY=VALUE",
                       help="e.g. rule=i2p for nudenet, concept='red triangle' for shapes")
    audit.add_argument("--us-classifier", default=DEFAULT_US_CLASSIFIER,
                       help=f"scores the same images for US (default {DEFAULT_US_CLASSIFIER}, whose weights ship "
                            "with it; mhsc with --us-option tower=FILE --us-option head=FILE; none to skip)")
    audit.add_argument("--us-option", action="append", default=[], metavar="KEY=VALUE",
                       help="e.g. threshold=0.8, or tower=/models/vit-l-14.safetensors for mhsc")
    audit.add_argument("--baseline", help="the base model's report.json on the same probes (paired comparison)")
    audit.add_argument("--policy", help="TOML file of verdict policy fields")
    audit.add_argument("--sequential", action="store_true",
                       help="render in rounds and stop as soon as the verdict is settled (docs/sequential-audit.md)")
    audit.add_argument("--rounds", type=int, default=4, help="looks of a sequential audit")
    audit.add_argument("--steps", type=int, default=30)
    audit.add_argument("--guidance", type=float, default=7.5, help="where the probe file gives none")
    audit.add_argument("--batch-size", type=int, default=8)
    audit.add_argument("--dtype", default="float32",
                       help="rendering precision: float32, or float16/bfloat16 on a GPU (part of the image cache key)")
    audit.add_argument("--device", help="where the pipeline runs (default: cuda when there is one, else cpu)")
    audit.add_argument("--cache", help="image cache folder (renders keyed by model, prompt, seed, settings)")
    audit.add_argument("--out", default="runs/audit")
    audit.set_defaults(func=_cmd_audit)
