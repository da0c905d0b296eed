"""``ftgate align``: argument parsing only; the run's heavy imports wait for the command."""

from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("align", help="harden a base model with ResAlign (Algorithms 1-2)",
                            description="Harden a local diffusers model with ResAlign. The config (TOML or YAML) "
                                        "names the model, data, objective, outer loop, hypergradient and pi(C); "
                                        "see docs/alignment.md.")
    parser.add_argument("--config", required=True, help="TOML or YAML run configuration")
    parser.add_argument("--out", help="output folder (default: the config's `output`, relative to the config)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this output")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="checkpoint and stop once N outer steps are done (continue with --resume)")
    parser.set_defaults(func=_cmd_align)


def _cmd_align(args) -> int:
    from .run import run_alignment

    out = run_alignment(args.config, resume=args.resume, stop_after=args.stop_after, output=args.out)
    print(out)
    return 0
