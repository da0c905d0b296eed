"""Frozen-dataclass configs read from TOML/JSON mappings, with errors that name the field."""

from __future__ import annotations

from dataclasses import fields


def from_mapping(cls, data: dict, what: str):
    """``cls(**data)`` after rejecting unknown keys; the dataclass validates values itself."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {what} field(s) {sorted(unknown)}; allowed: {sorted(known)}")
    return cls(**data)
