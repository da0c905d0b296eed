"""Shared fixtures. Every test runs with the network closed except loopback."""

from __future__ import annotations

import ipaddress
import socket

import pytest


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)):  # unix socket path
        return True
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that tries to reach beyond this machine (a model hub, say)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if not _is_loopback(address):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()


@pytest.fixture
def database_url(tmp_path):
    """The gate's database for a test: SQLite by default (test_storage also runs PostgreSQL)."""
    return f"sqlite:///{tmp_path}/ftgate.db"


@pytest.fixture
def engine(database_url):
    """An engine on a database migrated to the code's head revision."""
    from gate.storage.db import make_engine, upgrade

    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine):
    from gate.storage.db import session_factory

    return session_factory(engine)


@pytest.fixture(scope="module")
def migrated(tmp_path_factory):
    """A SQLite database file migrated once per module, for tests that copy it (migrations are the slow part)."""
    from gate.storage.db import make_engine, upgrade

    path = tmp_path_factory.mktemp("migrated") / "ftgate.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from threads, and on a shared 2-core machine their spin-waits turn seconds
    into minutes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
