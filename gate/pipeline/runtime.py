"""What every stage needs, opened once per worker process: settings, database, artifact store."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gate.settings import Settings
from gate.storage.artifacts import ArtifactStore, Store
from gate.storage.db import make_engine, require_current, session_factory


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: Store

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        """Connect; refuses a database whose schema is not this code's (``ftgate db upgrade``)."""
        engine = make_engine(settings.database_url)
        require_current(engine)
        return cls(settings, engine, session_factory(engine), open_store(settings))


def open_store(settings: Settings) -> Store:
    """The artifact store ``settings`` name: a bucket (``artifact_store``) or the folder ``artifacts_dir``."""
    if settings.artifact_store is None:
        return ArtifactStore(settings.artifacts_dir)
    from urllib.parse import urlsplit

    from gate.storage.s3 import S3ArtifactStore

    parts = urlsplit(settings.artifact_store)
    return S3ArtifactStore(parts.netloc, settings.store_cache_dir, prefix=parts.path,
                           endpoint_url=settings.s3_endpoint_url)


def device() -> str | None:
    """Where a job's pipeline runs: the GPU when there is one (each job process owns one; see docs/worker.md)."""
    import torch

    return "cuda" if torch.cuda.is_available() else None
