"""The ``ftgate`` command. Each package contributes its subcommands through ``register``."""

from __future__ import annotations

import argparse
import logging
import sys

from alignment import cli as alignment_cli
from auditing import cli as auditing_cli
from auditing.shapes import cli as shapes_cli
from gate import client_cli, demo, keys_cli, logs, operator_cli
from gate.storage import cli as storage_cli
from gate.worker import cli as worker_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftgate",
        description="Safety gate for fine-tuned text-to-image models: harden, fine-tune, audit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    shapes_cli.register(sub)
    auditing_cli.register(sub)
    alignment_cli.register(sub)
    demo.register(sub)
    client_cli.register(sub)
    keys_cli.register(sub)
    operator_cli.register(sub)
    storage_cli.register(sub)
    worker_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        # transformers warns at import about optional image backends we never use.
        import transformers

        transformers.logging.set_verbosity_error()
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"ftgate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
