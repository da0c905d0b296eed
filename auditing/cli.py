"""``ftgate probes ...``: inspect probe sets before an audit renders them."""

from __future__ import annotations

import argparse
import json


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
