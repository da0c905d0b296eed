"""The artifact store: customer uploads, checkpoints and reports as files, content-addressed per tenant.

Layout under the store's root: ``tenants/<tenant_id>/sha256/<first two hex>/<sha256><suffix>``. The
database records the *key* (that path relative to the root), so the state directory can move. A file's
name is its content's sha256, so a stored file is never rewritten (a second put of the same bytes keeps
the first) and its integrity can be checked at any time. Each tenant's files live under its own prefix,
and a tenant may only resolve keys under that prefix.

Writes are atomic: bytes stream into a temporary file in the store (same filesystem), which is fsynced
and then renamed into place; a put that fails or exceeds its size limit leaves neither a partial file
nor the temporary one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from auditing.models.hashing import HashCache, sha256_file

from .models import TENANT_ID_PATTERN, check_tenant_id

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TMP_DIR, PARTIAL_SUFFIX = "tmp", ".partial"  # tenants/<tenant_id>/tmp/put-*.partial while a put streams
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
SUFFIX_PATTERN = re.compile(r"(\.[a-z0-9]{1,16}){0,2}")
# Unredacted renders kept for reviewers (``gate.pipeline.pair_images``): no row names them, and they go by age with
# the render cache (``gate.pipeline.retention``), never by the unreferenced-file sweep (``gate.storage.sweep``).
PAIR_IMAGE_SUFFIX = ".pair.png"
KEY_PATTERN = re.compile(rf"tenants/({TENANT_ID_PATTERN.pattern})/sha256/([0-9a-f]{{2}})/(\2[0-9a-f]{{62}})"
                         rf"{SUFFIX_PATTERN.pattern}")


class ArtifactTooLarge(ValueError):
    """A streamed put went over its byte limit; nothing was stored."""


class CorruptArtifact(ValueError):
    """A stored file's bytes do not hash to the sha256 its key names: changed since it was stored."""


@dataclass(frozen=True)
class StoredArtifact:
    tenant_id: str
    sha256: str
    size_bytes: int
    key: str  # relative to the store root; what the database records


class Store(ABC):
    """What every store does, and the key scheme they share: this module's folder store (the embedded default)
    and ``gate.storage.s3.S3ArtifactStore`` (a bucket that several hosts share)."""

    @abstractmethod
    def put(self, tenant_id: str, source: BinaryIO, *, suffix: str = "",
            max_bytes: int | None = None) -> StoredArtifact:
        """Stream ``source`` into the store, atomically; raises ``ArtifactTooLarge`` past ``max_bytes``."""

    @abstractmethod
    def path(self, tenant_id: str, key: str) -> Path:
        """A local file holding ``key``'s bytes; ``key`` must be one of ``tenant_id``'s keys."""

    @abstractmethod
    def exists(self, tenant_id: str, sha256: str, suffix: str = "") -> bool: ...

    @abstractmethod
    def read(self, tenant_id: str, key: str) -> bytes:
        """A small file's bytes, read from the store itself every time (no host keeps a copy, so a file removed
        is gone for every host at once); ``FileNotFoundError`` when it is gone, ``CorruptArtifact`` when its
        bytes do not hash to the sha256 its key names."""

    @abstractmethod
    def verify(self, tenant_id: str, key: str, cache: HashCache | None = None) -> bool:
        """Whether the bytes still hash to the sha256 the key names (before auditing or releasing them)."""

    @abstractmethod
    def delete(self, tenant_id: str, key: str) -> None:
        """Remove one of ``tenant_id``'s files (a put whose row never committed); missing is fine."""

    @abstractmethod
    def stored_files(self) -> Iterator[tuple[str, float]]:
        """Every stored file, every tenant's: its key and when it was last written or named again (what the
        sweep compares with the rows)."""

    @abstractmethod
    def partial_files(self) -> Iterator[tuple[str, float]]:
        """The temporary files of puts in progress, or of puts killed before their cleanup ran, with times."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Remove a stored or temporary file by its name (the sweep's, which checks no tenant)."""

    def key(self, tenant_id: str, sha256: str, suffix: str = "") -> str:
        check_name(tenant_id, suffix)
        if not SHA256_PATTERN.fullmatch(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return f"tenants/{tenant_id}/sha256/{sha256[:2]}/{sha256}{suffix}"

    @staticmethod
    def checked(tenant_id: str, key: str) -> str:
        """``key`` if it is one of ``tenant_id``'s keys (else ValueError, whatever exists)."""
        match = KEY_PATTERN.fullmatch(key)
        if match is None or match.group(1) != check_tenant_id(tenant_id):
            raise ValueError(f"{key!r} is not an artifact key of tenant {tenant_id!r}")
        return key

    @staticmethod
    def digest_of(key: str) -> str:
        """The sha256 a (checked) key names."""
        return KEY_PATTERN.fullmatch(key).group(3)

    def checked_bytes(self, key: str, data: bytes) -> bytes:
        """``data`` if it hashes to the sha256 ``key`` names, else ``CorruptArtifact``."""
        if hashlib.sha256(data).hexdigest() != self.digest_of(key):
            raise CorruptArtifact(f"{key} in {self!r} does not hash to the sha256 its key names")
        return data


class ArtifactStore(Store):
    """The store in a local folder (the embedded default; one host, or a filesystem every host mounts)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, tenant_id: str, key: str) -> Path:
        """The local file for ``key``, which must be one of ``tenant_id``'s keys."""
        return self.root / self.checked(tenant_id, key)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root})"

    def exists(self, tenant_id: str, sha256: str, suffix: str = "") -> bool:
        return (self.root / self.key(tenant_id, sha256, suffix)).is_file()

    def read(self, tenant_id: str, key: str) -> bytes:
        return self.checked_bytes(key, self.path(tenant_id, key).read_bytes())

    def verify(self, tenant_id: str, key: str, cache: HashCache | None = None) -> bool:
        """Whether the file still hashes to the sha256 its key names (check before auditing or releasing it);
        with ``cache``, a file unchanged since it was last read (size, mtime, inode, within the cache's age)
        is not read again, which is what each download of a released checkpoint needs."""
        path = self.path(tenant_id, key)
        digest = cache.sha256(path) if cache else sha256_file(path)
        return digest == self.digest_of(key)

    def delete(self, tenant_id: str, key: str) -> None:
        self.path(tenant_id, key).unlink(missing_ok=True)

    def stored_files(self) -> Iterator[tuple[str, float]]:
        return self._dated((self.root / "tenants").glob("*/sha256/*/*"))

    def partial_files(self) -> Iterator[tuple[str, float]]:
        return self._dated((self.root / "tenants").glob(f"*/{TMP_DIR}/*{PARTIAL_SUFFIX}"))

    def _dated(self, paths) -> Iterator[tuple[str, float]]:
        for path in paths:
            try:
                yield str(path.relative_to(self.root)), path.stat().st_mtime
            except FileNotFoundError:  # removed meanwhile (another sweeper)
                continue

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def put(self, tenant_id: str, source: BinaryIO, *, suffix: str = "",
            max_bytes: int | None = None) -> StoredArtifact:
        check_name(tenant_id, suffix)  # before touching the disk
        tmp_dir = self.root / "tenants" / tenant_id / TMP_DIR
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="put-", suffix=PARTIAL_SUFFIX)
        tmp = Path(tmp_name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK_BYTES):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise ArtifactTooLarge(f"upload exceeds the limit of {max_bytes} bytes (max_upload_bytes)")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha256 = digest.hexdigest()
            key = self.key(tenant_id, sha256, suffix)
            final = self.root / key
            if final.is_file():
                os.utime(final)  # named again: the sweep's grace period starts over (gate.storage.sweep)
                log.debug("artifact %s already stored", key)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
                _fsync_dir(final.parent)
                log.info("stored artifact %s (%d bytes)", key, size)
            return StoredArtifact(tenant_id, sha256, size, key)
        finally:
            tmp.unlink(missing_ok=True)


def check_name(tenant_id: str, suffix: str) -> None:
    check_tenant_id(tenant_id)
    if not SUFFIX_PATTERN.fullmatch(suffix):
        raise ValueError(f"artifact suffix must match {SUFFIX_PATTERN.pattern} (e.g. '.safetensors'); got {suffix!r}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the directory entry is data too."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
