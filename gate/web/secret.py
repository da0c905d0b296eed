"""The key that signs the reviewer pages' session cookies: random, made once per deployment, kept in the state
directory with owner-only permissions, never in the code.

Every API process of a deployment (gunicorn workers, replicas sharing the state directory) must sign with the
same key, so the first process to start creates the file atomically and every other one reads it. A key file
that others can read is refused: whoever reads it can forge a reviewer's session.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

KEY_FILE = "web-session.key"
KEY_BYTES = 32


class SecretKeyError(RuntimeError):
    """The session key file exists but cannot be used safely."""


def session_key(state_dir: Path) -> bytes:
    """The deployment's session-signing key, created under ``state_dir`` on first use (mode 0600)."""
    path = state_dir / KEY_FILE
    if not path.exists():
        _create(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretKeyError(f"{path} is accessible to group or others (mode {stat.filemode(mode)}); "
                             f"run: chmod 600 {path}")
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < KEY_BYTES:
        raise SecretKeyError(f"{path} holds {len(key)} bytes; a session key needs {KEY_BYTES} (delete it to "
                             "make a new one: every reviewer is signed out)")
    return key


def _create(path: Path) -> None:
    """Write a new key to a private temporary file, then link it into place: of two processes racing, one
    key wins and nobody reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(KEY_BYTES))
        os.link(tmp, path)
        log.info("created the reviewer pages' session key %s", path)
    except FileExistsError:
        pass  # another process made it first; use theirs
    finally:
        tmp.unlink(missing_ok=True)
