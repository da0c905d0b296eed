"""Reading a customer's zip without trusting anything it says about itself.

Every entry's name, type, flags and declared sizes are checked from the central directory
before a byte is decompressed; a member is then read with a cap of its declared size plus
one byte, so a member that decompresses past what it declared is caught on that byte, and
the sum of declared sizes (checked first) bounds everything that is ever decompressed.
Entries whose data overlap (the "overlapping files" zip bomb) are refused outright.
Nothing is extracted to disk here: callers get member bytes and write what they choose.
"""

from __future__ import annotations

import copy
import re
import stat
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

from .limits import IntakeError, IntakeLimits, MiB

ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".zst", ".lz4", ".7z",
                    ".rar", ".jar", ".whl", ".cab", ".iso")
ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"\x1f\x8b", b"\xfd7zXZ\x00", b"7z\xbc\xaf\x27\x1c",
                 b"Rar!\x1a\x07", b"\x28\xb5\x2f\xfd", b"\x04\x22\x4d\x18", b"MSCF\0\0\0\0",
                 *(b"BZh%d1AY&SY" % level for level in range(1, 10)))  # bzip2: level digit, then block magic
TAR_MAGIC_OFFSET = 257  # "ustar" in a tar header
ALLOWED_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
# Small members (captions) legitimately compress far better than images and cannot bomb.
RATIO_CHECK_MIN_BYTES = 1 * MiB
LOCAL_HEADER_BYTES = 30  # fixed part of a zip local file header
ENCRYPTION_FLAGS = 0x1 | 0x40  # traditional and strong encryption
SPOOL_IN_MEMORY_BYTES = 8 * MiB
_COPY_CHUNK = 1 * MiB
_DRIVE = re.compile(r"^[A-Za-z]:")


def is_archive(data: bytes) -> bool:
    """Whether bytes start like an archive or compressed stream, whatever the member is called."""
    return data.startswith(ARCHIVE_MAGIC) or data[TAR_MAGIC_OFFSET:TAR_MAGIC_OFFSET + 5] == b"ustar"


@contextmanager
def open_upload(upload: BinaryIO | str | Path, limits: IntakeLimits) -> Iterator[tuple[BinaryIO, int]]:
    """A seekable view of the upload and its size; refused (413) when over ``max_upload_bytes``.

    A non-seekable stream is spooled, counting as it goes, so an endless one is cut off at the limit.
    """
    def check(size: int) -> None:
        if size > limits.max_upload_bytes:
            raise IntakeError("too_large", f"upload is larger than max_upload_bytes={limits.max_upload_bytes}",
                              ["upload"])

    if isinstance(upload, (str, Path)):
        with open(upload, "rb") as f:
            size = f.seek(0, 2)
            check(size)
            f.seek(0)
            yield f, size
    elif upload.seekable():
        size = upload.seek(0, 2)
        check(size)
        upload.seek(0)
        yield upload, size
    else:
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES) as spool:
            size = 0
            while chunk := upload.read(_COPY_CHUNK):
                size += len(chunk)
                check(size)
                spool.write(chunk)
            spool.seek(0)
            yield spool, size


@contextmanager
def open_archive(upload: BinaryIO, limits: IntakeLimits) -> Iterator[tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]]:
    """The zip and its file entries (folders dropped), after every central-directory check."""
    try:
        zf = zipfile.ZipFile(upload)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise IntakeError("not_a_zip", f"upload is not a readable zip archive ({e})", ["upload"]) from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files:
            raise IntakeError("too_many_files", f"archive has {len(infos)} entries, more than "
                              f"max_files={limits.max_files}", ["upload"])
        for reason, message, offenders in _entry_checks(infos, limits):
            if offenders:
                raise IntakeError(reason, message, offenders)
        yield zf, [i for i in infos if not i.is_dir()]


def _name_problem(name: str) -> str | None:
    if "\\" in name or name.startswith("/") or _DRIVE.match(name) or ".." in name.split("/"):
        return "zip_slip"
    if any(unicodedata.category(c).startswith("C") for c in name):
        return "bad_name"
    if any(part in ("", ".") for part in name.rstrip("/").split("/")):
        return "bad_name"
    return None


def _file_type(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_IFMT(mode) in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no unix mode recorded (DOS/Windows zips)
        return "ok"
    return "special_file"


def _duplicates(infos: list[zipfile.ZipInfo]) -> list[str]:
    seen: dict[str, list[str]] = {}
    for info in infos:
        key = unicodedata.normalize("NFC", info.filename.rstrip("/")).casefold()
        seen.setdefault(key, []).append(info.filename)
    return [name for names in seen.values() if len(names) > 1 for name in names]


def _overlaps(infos: list[zipfile.ZipInfo]) -> list[str]:
    """Entries whose local header starts inside the previous entry's header or data."""
    ordered = sorted(infos, key=lambda i: i.header_offset)
    return [name for a, b in pairwise(ordered)
            if b.header_offset < a.header_offset + LOCAL_HEADER_BYTES + a.compress_size
            for name in (a.filename, b.filename)]


def _entry_checks(infos: list[zipfile.ZipInfo], limits: IntakeLimits) -> Iterator[tuple[str, str, list[str]]]:
    """(reason, message, offenders) in the order they are judged; the first with offenders wins."""
    names = [i.filename for i in infos]
    # zipfile cuts a name at its first NUL, hiding the rest ("a.txt\0/../../x"); judge the name as stored.
    truncated = [i.orig_filename for i in infos if "\0" in i.orig_filename]
    yield "bad_name", "names may not contain NUL characters", truncated
    yield ("zip_slip", "absolute paths, '..' components, drive letters and backslashes are not allowed",
           [n for n in names if _name_problem(n) == "zip_slip"])
    yield ("bad_name", "names may not contain control characters or empty or '.' components",
           [n for n in names if _name_problem(n) == "bad_name"])
    yield "symlink", "symbolic links are not allowed", [i.filename for i in infos if _file_type(i) == "symlink"]
    yield ("special_file", "only regular files and folders are allowed",
           [i.filename for i in infos if _file_type(i) == "special_file"])
    yield ("encrypted", "encrypted members are not allowed",
           [i.filename for i in infos if i.flag_bits & ENCRYPTION_FLAGS])
    methods = ", ".join(ALLOWED_COMPRESSION.values())
    yield ("format_not_allowed", f"compression methods other than {methods} are not allowed",
           [i.filename for i in infos if i.compress_type not in ALLOWED_COMPRESSION])
    yield "duplicate_name", "names must be unique, ignoring case", _duplicates(infos)
    yield ("zip_bomb", f"members declare more than max_member_bytes={limits.max_member_bytes} decompressed",
           [i.filename for i in infos if i.file_size > limits.max_member_bytes])
    total = sum(i.file_size for i in infos)
    too_much = f"members declare {total} bytes in all, more than max_extracted_bytes={limits.max_extracted_bytes}"
    yield ("zip_bomb", too_much, [i.filename for i in sorted(infos, key=lambda i: -i.file_size)]
           if total > limits.max_extracted_bytes else [])
    yield ("zip_bomb", f"members compress more than max_compression_ratio={limits.max_compression_ratio:g} to 1",
           [i.filename for i in infos if i.file_size > RATIO_CHECK_MIN_BYTES
            and i.file_size > limits.max_compression_ratio * max(i.compress_size, 1)])
    yield "zip_bomb", "entries overlap one another", _overlaps(infos)


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, decompressing at most one byte past its declared size, CRC checked."""
    declared = info.file_size
    probe = copy.copy(info)
    probe.file_size = declared + 1  # zipfile stops at the declared size; let it run one byte further
    probe.CRC = None  # and check the CRC here, once the length is known to be right
    try:
        with zf.open(probe) as f:
            data = f.read(declared + 1)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, OSError) as e:
        raise IntakeError("corrupt_zip", f"member cannot be read ({e})", [info.filename]) from None
    if len(data) > declared:
        raise IntakeError("zip_bomb", f"member decompresses past its declared size of {declared} bytes",
                          [info.filename])
    if len(data) < declared:
        raise IntakeError("corrupt_zip", f"member holds {len(data)} bytes but declares {declared}",
                          [info.filename])
    if zlib.crc32(data) != info.CRC:
        raise IntakeError("corrupt_zip", "member fails its CRC-32 check", [info.filename])
    return data
