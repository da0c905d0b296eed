"""The dataset folder layouts customers upload, read without torch.

Images with same-name ``.txt`` captions, or diffusers' ``imagefolder`` layout
(``metadata.jsonl`` lines ``{"file_name": ..., "text": ...}``, ``"caption"`` accepted for
``"text"``). Intake (the API process, kept torch-free) writes the first; training and
hardening read both.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METADATA = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption")  # imagefolder caption column: diffusers' default, or the common alternative


def dataset_entries(folder: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a caption folder or an imagefolder with ``metadata.jsonl``; no image
    is decoded (an audit reads the captions alone)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such dataset folder")
    entries = []
    if (folder / METADATA).is_file():
        for line_no, line in enumerate((folder / METADATA).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name = record["file_name"]
                (caption,) = [record[k] for k in CAPTION_KEYS if k in record]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{folder / METADATA} line {line_no}: needs 'file_name' and exactly one of "
                                 f"{CAPTION_KEYS} ({exc})") from None
            path = folder / name
            if path.parent != folder or not path.is_file():
                raise ValueError(f"{folder / METADATA} line {line_no}: {name!r} is not a file in {folder}")
            entries.append((path, str(caption).strip()))
    else:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = path.with_suffix(".txt")
            if not caption.is_file():
                raise ValueError(f"{path.name}: no caption file {caption.name}")
            entries.append((path, caption.read_text().strip()))
    if not entries:
        raise ValueError(f"{folder}: no images")
    return entries


def load_examples(folder: str | Path) -> list[tuple[Image.Image, str]]:
    """(image, caption) pairs from a caption folder or an imagefolder with ``metadata.jsonl``."""
    return [(Image.open(path).convert("RGB"), caption) for path, caption in dataset_entries(folder)]
