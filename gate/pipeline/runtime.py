"""What every stage needs, opened once per worker process: settings, database, artifact store."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from gate.settings import Settings
from gate.storage.artifacts import ArtifactStore
from gate.storage.db import make_engine, require_current, session_factory


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        """Connect; refuses a database whose schema is not this code's (``ftgate db upgrade``)."""
        engine = make_engine(settings.database_url)
        require_current(engine)
        return cls(settings, engine, session_factory(engine), ArtifactStore(settings.artifacts_dir))


def device() -> str | None:
    """Where a job's pipeline runs: the GPU when there is one (each job process owns one; see docs/worker.md)."""
    import torch

    return "cuda" if torch.cuda.is_available() else None
