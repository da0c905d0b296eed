"""``ftgate datasets ...`` and ``ftgate jobs ...``: the customer client (``gate.client``) on the command line.

The URL comes from ``--url`` or ``FTGATE_URL``, the key only from ``FTGATE_API_KEY`` (a key on the command line
would sit in the shell history and the process list). ``--json`` prints machine-readable output only on stdout
(one JSON document, or one event per line); messages and progress bars go to stderr, the bars only to a
terminal. A refused request prints the API's reason, field and limit and exits 1; ``--json`` also prints its
error body on stdout. ``jobs wait`` exits 0 when the job is released, 1 when it settled otherwise (in review,
withheld, failed, cancelled) and 3 when the timeout passed first. ``datasets upload`` waits for the intake on the
gate's worker in the same way: 0 when the dataset is accepted, 1 when flagged, rejected or failed, 3 on timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from gate.logs import printable

TIMED_OUT = 3


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True)


def _bar(**kwargs):
    """A progress bar on stderr, drawn only on a terminal (``disable=None``), never over ``--json`` output."""
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, disable=None, dynamic_ncols=True, **kwargs)


def _byte_progress(bar) -> Callable[[int, int | None], None]:
    def update(done: int, total: int | None) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update


def _job_progress(bar) -> Callable[[dict], None]:
    def update(job: dict) -> None:
        bar.n = round(100 * job["progress"])
        bar.set_postfix_str(f"{job['status']}: {job['stage'] or ''}")

    return update


def _hyperparameters(text: str | None) -> dict:
    """``--hyperparameters``: a JSON object, or ``@file`` holding one."""
    if text is None:
        return {}
    source = "--hyperparameters"
    if text.startswith("@"):
        source, text = text[1:], Path(text[1:]).read_text()
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{source} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source} must be a JSON object of hyperparameters (docs/training.md)")
    return value


def _show_job(job: dict) -> list[str]:
    stage = f" ({job['stage']}, {job['progress']:.0%})" if job["stage"] else ""
    lines = [f"job {job['id']}: {job['status']}{stage}"]
    if verdict := job.get("verdict"):
        lines.append(f"  verdict {verdict['decision']}: {'; '.join(verdict['reasons'])}")
    if job.get("error"):
        lines.append(f"  error: {job['error']}")
    if artifact := job.get("artifact"):
        lines.append(f"  checkpoint ({artifact['kind']}, {artifact['size_bytes']} bytes, sha256 {artifact['sha256']}): "
                     + ("downloadable" if artifact["downloadable"] else "not downloadable"))
    return lines


def _dataset_progress(bar) -> Callable[[dict], None]:
    """The intake's state as the bar's text (it reports no fraction): each poll ticks the bar."""
    def update(dataset: dict) -> None:
        bar.update()
        bar.set_postfix_str(dataset["status"])

    return update


def _show_dataset(dataset: dict) -> list[str]:
    lines = [f"dataset {dataset['id']}: {dataset['status']}, {dataset['image_count']} images, "
             f"contamination {dataset['contamination_ratio']}"]
    if refusal := dataset.get("refusal"):
        lines.append(f"  refused ({refusal['status']} {refusal['reason']}): {printable(refusal['message'])}")
    if dataset.get("error"):
        lines.append(f"  error: {dataset['error']}")
    return lines


def _cmd_upload(client, args):
    from gate.client import WaitTimeout

    with _bar(desc="upload", unit="B", unit_scale=True, unit_divisor=1024) as bar:
        dataset = client.upload_dataset(args.file, name=args.name, progress=_byte_progress(bar), wait=False)
    if args.no_wait:
        return dataset, _show_dataset(dataset)
    with _bar(desc="intake", unit="poll", bar_format="{desc}: {postfix} ({elapsed})") as bar:
        try:
            dataset = client.wait_dataset(dataset["id"], timeout_s=args.timeout, on_poll=_dataset_progress(bar))
        except WaitTimeout as exc:
            dataset = exc.jobs[dataset["id"]]
            return dataset, [str(exc), *_show_dataset(dataset)], TIMED_OUT
    return dataset, _show_dataset(dataset), 0 if dataset["status"] == "accepted" else 1


def _cmd_create(client, args):
    job = client.create_job(args.base_model, args.dataset, args.method, _hyperparameters(args.hyperparameters),
                            args.idempotency_key)
    return job, _show_job(job)


def _cmd_list(client, args):
    jobs = client.jobs()
    return {"jobs": jobs}, [f"{j['id']}  {j['status']:<9} {j['method']:<10} {j['created_at']}" for j in jobs] \
        or ["no jobs"]


def _cmd_show(client, args):
    job = client.job(args.job)
    return job, _show_job(job)


def _cmd_wait(client, args):
    from gate.client import WaitTimeout

    with _bar(total=100, desc=args.job[:12], unit="%", bar_format="{desc}: {bar} {postfix}") as bar:
        try:
            job = client.wait(args.job, timeout_s=args.timeout, on_poll=_job_progress(bar))
        except WaitTimeout as exc:
            job = exc.jobs[args.job]
            return job, [str(exc), *_show_job(job)], TIMED_OUT
    return job, _show_job(job), 0 if job["status"] == "released" else 1


def _cmd_cancel(client, args):
    job = client.cancel(args.job)
    return job, _show_job(job)


def _cmd_requeue(client, args):
    job = client.requeue(args.job, args.reason)
    return job, _show_job(job)


def _cmd_download(client, args):
    with _bar(desc="download", unit="B", unit_scale=True, unit_divisor=1024) as bar:
        out = client.download(args.job, args.out, progress=_byte_progress(bar))
    return {"job": args.job, "path": str(out), "size_bytes": out.stat().st_size}, [f"checkpoint written to {out}"]


def _cmd_report(client, args):
    report = client.report(args.job)
    verdict = report.get("verdict") or {}
    return report, [f"verdict {verdict.get('decision')}: {'; '.join(verdict.get('reasons', []))}"]


def _cmd_events(client, args):
    events = (client.follow_events(args.job, args.after) if args.follow
              else client.events(args.job, args.after)["events"])
    for event in events:
        print(_dumps(event) if args.json else
              printable(f"{event['seq']:>6} {event['at']} {event['kind']:<10} {_dumps(event['data'])}"), flush=True)
    return None


def _run(command):
    """A subcommand's body around a ``Client``: refusals and unreachable gates become messages and exit 1."""
    import requests

    from gate.client import Client, DownloadError, GateError

    def run(args) -> int:
        client = Client(args.url)
        try:
            result = command(client, args)
        except GateError as exc:
            if args.json:
                print(_dumps({"error": {"status": exc.status, **exc.body}}))
            print(f"ftgate: error: {printable(str(exc))}", file=sys.stderr)
            return 1
        except requests.ConnectionError as exc:
            print(f"ftgate: error: cannot reach the gate at {printable(client.url)} ({exc.__class__.__name__}: "
                  f"{printable(str(exc))})", file=sys.stderr)
            return 1
        except (DownloadError, requests.RequestException) as exc:
            print(f"ftgate: error: {printable(str(exc))}", file=sys.stderr)
            return 1
        if result is None:  # the command printed as it went
            return 0
        value, lines, *code = result
        print(_dumps(value) if args.json else "\n".join(printable(line) for line in lines))
        return code[0] if code else 0

    return run


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the gate's API (default: $FTGATE_URL); the key is read from $FTGATE_API_KEY")
    common.add_argument("--json", action="store_true", help="machine-readable output only, on stdout")

    def command(parent, name: str, func, text: str) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=text, parents=[common])
        parser.set_defaults(func=_run(func))
        return parser

    datasets = sub.add_parser("datasets", help="customer datasets on a gate (the API client)").add_subparsers(
        dest="datasets_command", required=True)
    upload = command(datasets, "upload", _cmd_upload, "upload a dataset zip (docs/intake.md)")
    upload.add_argument("file", help="the zip of images and same-name captions")
    upload.add_argument("--name", help="the dataset's name (default: the file name)")
    upload.add_argument("--no-wait", action="store_true",
                        help="return once the upload is stored (status received), not after its intake")
    upload.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds to wait for the intake (default 1800; then exit 3)")

    jobs = sub.add_parser("jobs", help="fine-tuning jobs on a gate (the API client)").add_subparsers(
        dest="jobs_command", required=True)
    create = command(jobs, "create", _cmd_create, "ask for a fine-tuning job")
    create.add_argument("--base-model", required=True, help="the base model's id")
    create.add_argument("--dataset", required=True, help="an accepted dataset's id")
    create.add_argument("--method", required=True, choices=("lora", "dreambooth"))
    create.add_argument("--hyperparameters", help="a JSON object, or @FILE holding one (docs/training.md)")
    create.add_argument("--idempotency-key", help="a retry with the same key returns the job the first created")
    command(jobs, "list", _cmd_list, "your jobs, newest first")
    for name, func, text in (("show", _cmd_show, "a job with its verdict and checkpoint"),
                             ("wait", _cmd_wait, "wait until the job settles (exit 0: released)"),
                             ("cancel", _cmd_cancel, "cancel a job (a running one stops at its next step)"),
                             ("report", _cmd_report, "the job's audit report (JSON)"),
                             ("download", _cmd_download, "download a released job's checkpoint"),
                             ("events", _cmd_events, "the job's events: stages, loss, samples, verdict"),
                             ("requeue", _cmd_requeue, "operators: queue a failed job again from a clean state")):
        parser = command(jobs, name, func, text)
        parser.add_argument("job", help="the job's id")
        if name == "wait":
            parser.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
        elif name == "download":
            parser.add_argument("--out", required=True, help="the file to write (pytorch_lora_weights.safetensors "
                                                             "for a LoRA, unet.zip for DreamBooth)")
        elif name == "requeue":
            parser.add_argument("--reason", required=True, help="why, for the audit log")
        elif name == "events":
            parser.add_argument("--after", type=int, help="only events after this seq")
            parser.add_argument("--follow", action="store_true", help="keep reading until the job settles")
