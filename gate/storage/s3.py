"""The artifact store in an S3-compatible bucket, so workers on several GPU hosts share nothing but the
database, the broker and the bucket (the folder store, ``gate.storage.artifacts.ArtifactStore``, stays the
embedded default).

Same keys as the folder store (``tenants/<tenant_id>/sha256/<2 hex>/<sha256><suffix>``) under an optional
prefix, same tenant check on every key. A put streams into a temporary object
(``tenants/<tenant_id>/tmp/put-<random>.partial``) while hashing, then copies it to its content-addressed key
and deletes the temporary one: a reader never sees a partial object, and a put killed mid-stream leaves only a
temporary object, which the sweep removes. A put of bytes already stored copies the object onto itself, so its
time starts the sweep's grace period over, as the folder store's ``utime`` does.

Reads go through a local cache (``cache_dir``): an object is downloaded once, hashed while it downloads, and
kept only if it hashes to the sha256 its key names, so what a worker audits and what a customer downloads is
always what was stored, whatever happened in the bucket since. ``verify`` hashes that local copy. ``read`` (small
files: a reviewer's images) skips that cache, so a removed object is gone for every host at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from auditing.models.hashing import HashCache, sha256_file

from .artifacts import CHUNK_BYTES, PARTIAL_SUFFIX, TMP_DIR, ArtifactTooLarge, Store, StoredArtifact, check_name

log = logging.getLogger(__name__)

NOT_FOUND = ("404", "NoSuchKey", "NotFound")


class _Hashing:
    """A reader over ``source`` that hashes and counts what passes, and stops past ``max_bytes``."""

    def __init__(self, source: BinaryIO, max_bytes: int | None):
        self.source, self.max_bytes = source, max_bytes
        self.digest, self.size = hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.source.read(n if n is not None and n >= 0 else CHUNK_BYTES)
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise ArtifactTooLarge(f"upload exceeds the limit of {self.max_bytes} bytes (max_upload_bytes)")
        self.digest.update(chunk)
        return chunk


class S3ArtifactStore(Store):
    def __init__(self, bucket: str, cache_dir: str | Path, *, prefix: str = "", client=None,
                 endpoint_url: str | None = None):
        """``client``: a boto3 S3 client (default: one from the standard AWS configuration and credentials,
        at ``endpoint_url`` for an S3-compatible server)."""
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint_url)
        self.client, self.bucket = client, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.cache_dir = Path(cache_dir)

    def __repr__(self) -> str:
        return f"S3ArtifactStore(s3://{self.bucket}/{self.prefix})"

    def _object(self, name: str) -> str:
        return self.prefix + name

    def _missing(self, exc: Exception) -> bool:
        error = getattr(exc, "response", {}).get("Error", {})
        return str(error.get("Code")) in NOT_FOUND

    def _head(self, name: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._object(name))
        except ClientError as exc:
            if self._missing(exc):
                return None
            raise

    def put(self, tenant_id: str, source: BinaryIO, *, suffix: str = "",
            max_bytes: int | None = None) -> StoredArtifact:
        check_name(tenant_id, suffix)
        tmp = f"tenants/{tenant_id}/{TMP_DIR}/put-{secrets.token_hex(8)}{PARTIAL_SUFFIX}"
        reader = _Hashing(source, max_bytes)
        try:
            self.client.upload_fileobj(reader, self.bucket, self._object(tmp))
            sha256 = reader.digest.hexdigest()
            key = self.key(tenant_id, sha256, suffix)
            stored = self._head(key) is not None
            source_object = {"Bucket": self.bucket, "Key": self._object(key if stored else tmp)}
            # Named again: copying the object onto itself renews its time (the sweep's grace period).
            self.client.copy(source_object, self.bucket, self._object(key),
                             ExtraArgs={"MetadataDirective": "REPLACE", "Metadata": {"sha256": sha256}})
            log.info("%s artifact %s (%d bytes) in %r", "renewed" if stored else "stored", key, reader.size, self)
            return StoredArtifact(tenant_id, sha256, reader.size, key)
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=self._object(tmp))

    def path(self, tenant_id: str, key: str) -> Path:
        local = self.cache_dir / self.checked(tenant_id, key)
        if local.is_file():
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=local.parent, prefix="get-", suffix=PARTIAL_SUFFIX)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                body = self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"]
                while chunk := body.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != self.digest_of(key):
                raise ValueError(f"object {key} in {self!r} does not hash to the sha256 its key names: "
                                 "it was changed in the bucket; it is not used")
            os.replace(tmp, local)
            return local
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, tenant_id: str, sha256: str, suffix: str = "") -> bool:
        return self._head(self.key(tenant_id, sha256, suffix)) is not None

    def read(self, tenant_id: str, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._object(self.checked(tenant_id, key)))["Body"]
        except ClientError as exc:
            if self._missing(exc):
                raise FileNotFoundError(f"{key} is not in {self!r}") from None
            raise
        return self.checked_bytes(key, body.read())

    def verify(self, tenant_id: str, key: str, cache: HashCache | None = None) -> bool:
        self.checked(tenant_id, key)  # another tenant's key is refused, as the folder store refuses it
        try:
            path = self.path(tenant_id, key)
        except ValueError:
            return False
        digest = cache.sha256(path) if cache else sha256_file(path)
        return digest == self.digest_of(key)

    def delete(self, tenant_id: str, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object(self.checked(tenant_id, key)))
        (self.cache_dir / key).unlink(missing_ok=True)

    def _listing(self, under: str) -> Iterator[tuple[str, float]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=self._object(under))
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix):], item["LastModified"].timestamp()

    def stored_files(self) -> Iterator[tuple[str, float]]:
        return ((name, at) for name, at in self._listing("tenants/") if "/sha256/" in name)

    def partial_files(self) -> Iterator[tuple[str, float]]:
        return ((name, at) for name, at in self._listing("tenants/")
                if f"/{TMP_DIR}/" in name and name.endswith(PARTIAL_SUFFIX))

    def remove(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object(name))
        (self.cache_dir / name).unlink(missing_ok=True)
