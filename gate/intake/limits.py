"""What a customer upload may be, and how a rejection is reported.

The limits are one frozen record (``auditing.config.record``: bounds in the types, a bad value a
``ConfigError`` naming the field) so that settings, the API and the intake record name the same
fields. A rejection is one exception type carrying the HTTP status, a reason code from a fixed set
(bounded, so it can be a Prometheus label) and the offending members, so the customer is told which
files broke which limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Annotated

from pydantic import Field

from auditing.config import ConfigError, record
from gate.logs import printable  # file names in messages: a zip entry cannot forge log lines
from gate.settings import Ratio

MiB = 1 << 20

# Reason code -> HTTP status. 400: malformed, 413: too large, 415: unsupported, 422: refused by policy.
REASONS: dict[str, int] = {
    "not_a_zip": 400,
    "corrupt_zip": 400,
    "zip_slip": 400,
    "bad_name": 400,
    "symlink": 400,
    "special_file": 400,
    "duplicate_name": 400,
    "bad_layout": 400,
    "empty": 400,
    "missing_caption": 400,
    "orphan_caption": 400,
    "bad_metadata": 400,
    "bad_caption": 400,
    "empty_caption": 400,
    "caption_too_long": 400,
    "bad_image": 400,
    "too_large": 413,
    "too_many_files": 413,
    "zip_bomb": 413,
    "decompression_bomb": 413,
    "format_not_allowed": 415,
    "nested_archive": 415,
    "encrypted": 415,
    "contaminated": 422,
}

# How many offending members a message lists before "and N more" (``files`` keeps them all).
NAMED_IN_MESSAGE = 10


class IntakeError(ValueError):
    """A rejected upload: ``status`` (HTTP), ``reason`` (a key of ``REASONS``), ``files`` (offenders)."""

    def __init__(self, reason: str, message: str, files: Sequence[str] = ()):
        if reason not in REASONS:
            raise ValueError(f"unknown intake reason {reason!r}")
        self.reason = reason
        self.status = REASONS[reason]
        self.message = message
        self.files = list(files)
        named = ", ".join(map(printable, self.files[:NAMED_IN_MESSAGE]))
        more = len(self.files) - NAMED_IN_MESSAGE
        if more > 0:
            named += f" and {more} more"
        super().__init__(f"{message}: {named}" if named else message)

    def as_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "message": str(self), "files": self.files}


Count = Annotated[int, Field(ge=1)]


@record
class IntakeLimits:
    """Limits on one upload. Sizes are bytes; ratios are fractions of the dataset's images."""

    max_upload_bytes: Count = 256 * MiB  # the zip as uploaded
    max_files: Count = 10_000  # archive entries, folders included
    max_member_bytes: Count = 32 * MiB  # one member, decompressed
    max_extracted_bytes: Count = 1024 * MiB  # all members, decompressed
    max_compression_ratio: Annotated[float, Field(ge=1.0)] = 100.0  # decompressed / compressed, members over 1 MiB
    max_image_pixels: Count = 4096 * 4096
    max_reencoded_bytes: Count = 4096 * MiB  # all re-encoded PNGs (a photo's PNG is 5-15x its JPEG)
    max_caption_chars: Count = 1000
    allow_empty_captions: bool = False
    contamination_flag_ratio: Ratio = 0.0  # above this share of unsafe images: accepted but flagged
    contamination_reject_ratio: Ratio = 0.1  # above this: rejected

    def __post_init__(self):
        if self.contamination_flag_ratio > self.contamination_reject_ratio:
            raise ConfigError("contamination_flag_ratio",
                              f"contamination_flag_ratio ({self.contamination_flag_ratio:g}) must not exceed "
                              f"contamination_reject_ratio ({self.contamination_reject_ratio:g})")

    def as_dict(self) -> dict:
        return asdict(self)
