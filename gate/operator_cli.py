"""The operator's commands at the gate's host, with the API's own rules (``gate.service``) and no API key:

* ``ftgate base-models register|list|show``: the base models customers may fine-tune, checked as
  ``POST /v1/base-models`` checks them. ``register`` takes the audit profile as a JSON file (docs/api.md lists
  its fields) and queues the model's baseline audit on the configured broker.
* ``ftgate reviews list``: what waits for a reviewer, flagged jobs and flagged datasets, longest-waiting first
  (decisions are taken on the reviewer pages or through the API, with a reviewer's key).

``--json`` prints one JSON object per row, as the API shows it to staff.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from .service.errors import ApiError
from .settings import load_settings
from .storage.audit_log import SYSTEM
from .storage.db import make_engine, require_current, session_factory


def _sessions(settings):
    engine = make_engine(settings.database_url)
    require_current(engine)
    return session_factory(engine)


def _show(row, as_json: bool) -> None:
    from .api.serialize import base_model_json

    if as_json:
        print(json.dumps(base_model_json(row, staff=True)))
        return
    baseline = "baseline ready" if row.baseline_report_path else "no baseline yet"
    print(f"{row.id}  {row.name:<30} {baseline:<16} {row.weights_sha256[:12]}  {row.path}")


def _refused(exc: ApiError) -> int:
    field = exc.extra.get("field")
    print(f"ftgate: error: {exc.message}" + (f" (field {field})" if field else ""), file=sys.stderr)
    return 2


def _cmd_register(args) -> int:
    from .service.base_models import register_base_model
    from .worker.dispatch import CeleryDispatcher

    try:
        profile = json.loads(Path(args.profile).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"ftgate: error: --profile {args.profile}: {exc}", file=sys.stderr)
        return 2
    body = {"name": args.name, "path": args.path, "audit_profile": profile, "config": args.config,
            "variant": args.variant, "vae": args.vae}
    settings = load_settings(path=args.config_file)
    with _sessions(settings)() as session:
        try:
            row = register_base_model(session, body, SYSTEM, settings.hash_cache_file,
                                      CeleryDispatcher.for_settings(settings))
        except ApiError as exc:
            return _refused(exc)
        _show(row, args.json)
    return 0


def _cmd_list(args) -> int:
    from .service.base_models import list_base_models

    with _sessions(load_settings(path=args.config_file))() as session:
        cursor = None
        while True:
            page = list_base_models(session, cursor=cursor)
            for row in page.rows:
                _show(row, args.json)
            if (cursor := page.next_cursor) is None:
                return 0


def _cmd_show(args) -> int:
    from .service.base_models import get_base_model

    with _sessions(load_settings(path=args.config_file))() as session:
        try:
            _show(get_base_model(session, args.base_model_id), args.json)
        except ApiError as exc:
            return _refused(exc)
    return 0


def _cmd_reviews(args) -> int:
    from .api.serialize import dataset_json, job_json
    from .service.reviews import WAITING_DATASETS, WAITING_JOBS

    with _sessions(load_settings(path=args.config_file))() as session:
        jobs, datasets = session.scalars(WAITING_JOBS).all(), session.scalars(WAITING_DATASETS).all()
        for kind, rows, as_dict in (("job", jobs, partial(job_json, staff=True)), ("dataset", datasets, dataset_json)):
            for row in rows:
                if args.json:
                    print(json.dumps({"kind": kind, **as_dict(row)}))
                else:
                    waiting = (row.updated_at if kind == "job" else row.created_at).strftime("%Y-%m-%d %H:%M")
                    print(f"{kind:<8} {row.id}  tenant {row.tenant_id:<20} waiting since {waiting}")
    if not args.json:
        print(f"{len(jobs)} job(s) and {len(datasets)} dataset(s) wait for a reviewer", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``base-models`` and ``reviews`` subcommands to the ``ftgate`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config-file", help="the gate's settings file (default $FTGATE_CONFIG)")
    common.add_argument("--json", action="store_true", help="one JSON object per row, as the API shows staff")
    reviews = sub.add_parser("reviews", help="what waits for a reviewer: list")
    rsub = reviews.add_subparsers(dest="reviews_command", required=True)
    rsub.add_parser("list", parents=[common], help="flagged jobs and datasets, longest-waiting first") \
        .set_defaults(func=_cmd_reviews)
    models = sub.add_parser("base-models", help="base models customers may fine-tune: register, list, show")
    msub = models.add_subparsers(dest="base_models_command", required=True)
    reg = msub.add_parser("register", parents=[common], help="check, hash and register a model; queue its baseline")
    reg.add_argument("--name", required=True, help="unique name customers choose it by")
    reg.add_argument("--path", required=True, help="a local diffusers folder or a single .safetensors checkpoint")
    reg.add_argument("--profile", required=True, help="the audit profile, a JSON file (probes, detector, ...)")
    reg.add_argument("--config", help="for a single-file checkpoint: a diffusers folder of the same architecture")
    reg.add_argument("--variant", help="weights variant, e.g. fp16 (*.fp16.safetensors)")
    reg.add_argument("--vae", help="a VAE folder that replaces the model's own")
    reg.set_defaults(func=_cmd_register)
    listing = msub.add_parser("list", parents=[common], help="every registered base model")
    listing.set_defaults(func=_cmd_list)
    show = msub.add_parser("show", parents=[common], help="one base model by id")
    show.add_argument("base_model_id")
    show.set_defaults(func=_cmd_show)
