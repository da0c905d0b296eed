"""Dataset intake: a customer's zip in; a checked, re-encoded caption folder out, or nothing at all.

Checks run cheapest first: the upload's size, the central directory (names, types, flags,
declared sizes, overlaps), the layout (file types, folders, caption pairing), then content:
every caption, then every image (decoded under limits, re-encoded to PNG), then the
contamination scan of the re-encoded images. Structural checks name every offending
member; content checks stop at the first bad file, so a hostile upload costs little.

Everything is written to a hidden ``.<name>.partial-<random>`` sibling of the output
folder, which is renamed into place only when every check has passed and removed on any
failure, so a refused upload leaves no files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import unicodedata
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from auditing.detectors.base import Detector
from auditing.layouts import CAPTION_KEYS, IMAGE_SUFFIXES, METADATA
from gate import metrics

from .archive import ARCHIVE_SUFFIXES, is_archive, open_archive, open_upload, read_member
from .images import reencode
from .limits import IntakeError, IntakeLimits
from .scan import REJECTED, Screening, judge, scan_images

logger = logging.getLogger(__name__)

RECORD = "intake.json"
# Left behind by macOS and Windows archivers; never read or copied.
JUNK_FOLDERS = ("__MACOSX",)
JUNK_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")


@dataclass(frozen=True)
class IntakeResult:
    folder: Path
    status: str  # "accepted" or "flagged"
    images: int
    unsafe_images: int
    contamination: float
    flagged: tuple[str, ...]  # names in the upload of the images the scanner called unsafe
    layout: str  # "captions" or "imagefolder"

    def as_dict(self) -> dict:
        return {**asdict(self), "folder": str(self.folder)}


@dataclass(frozen=True)
class _Example:
    image: zipfile.ZipInfo
    name: str  # path in the upload, below a shared top-level folder
    caption: str
    caption_source: str


def _key(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def _is_junk(name: str) -> bool:
    path = PurePosixPath(name)
    return path.parts[0] in JUNK_FOLDERS or path.name in JUNK_FILES


def _relative_names(files: list[zipfile.ZipInfo]) -> dict[str, str]:
    """Archive name -> name below one top-level folder that holds everything, if there is one."""
    parts = [PurePosixPath(f.filename).parts for f in files]
    shared = len({p[0] for p in parts}) == 1 and all(len(p) > 1 for p in parts)
    return {f.filename: "/".join(p[1:] if shared else p) for f, p in zip(files, parts)}


def _caption(raw: str, source: str, limits: IntakeLimits) -> str:
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in raw):
        raise IntakeError("bad_caption", "captions may not contain control characters", [source])
    if any(unicodedata.category(c) == "Cs" for c in raw):  # JSON "\ud800": not encodable as UTF-8
        raise IntakeError("bad_caption", "captions must be valid Unicode (no lone surrogates)", [source])
    text = raw.strip()
    if len(text) > limits.max_caption_chars:
        raise IntakeError("caption_too_long", f"caption has {len(text)} characters, more than "
                          f"max_caption_chars={limits.max_caption_chars}", [source])
    if not text and not limits.allow_empty_captions:
        raise IntakeError("empty_caption", "captions may not be empty (allow_empty_captions=False)", [source])
    return text


def _read_text(zf: zipfile.ZipFile, info: zipfile.ZipInfo, reason: str) -> str:
    data = read_member(zf, info)
    if is_archive(data):
        raise IntakeError("nested_archive", "archives inside the upload are not allowed", [info.filename])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IntakeError(reason, "text must be UTF-8", [info.filename]) from None


def _from_caption_files(zf: zipfile.ZipFile, images: list[zipfile.ZipInfo], captions: list[zipfile.ZipInfo],
                        rel: dict[str, str], limits: IntakeLimits) -> list[_Example]:
    def by_stem(infos: list[zipfile.ZipInfo]) -> dict[str, list[zipfile.ZipInfo]]:
        groups: dict[str, list[zipfile.ZipInfo]] = {}
        for info in infos:
            groups.setdefault(_key(PurePosixPath(rel[info.filename]).stem), []).append(info)
        return groups

    image_stems, caption_stems = by_stem(images), by_stem(captions)
    shared = [i.filename for group in image_stems.values() if len(group) > 1 for i in group]
    if shared:
        raise IntakeError("duplicate_name", "images may not share a name stem (each takes one .txt caption)", shared)
    missing = [i.filename for stem, (i,) in image_stems.items() if stem not in caption_stems]
    if missing:
        raise IntakeError("missing_caption", "images need a same-name .txt caption", missing)
    orphans = [c.filename for stem, (c,) in caption_stems.items() if stem not in image_stems]
    if orphans:
        raise IntakeError("orphan_caption", "captions need a same-name image", orphans)
    examples = []
    for stem, (image,) in sorted(image_stems.items(), key=lambda kv: rel[kv[1][0].filename]):
        (caption,) = caption_stems[stem]
        text = _caption(_read_text(zf, caption, "bad_caption"), caption.filename, limits)
        examples.append(_Example(image, rel[image.filename], text, caption.filename))
    return examples


def _from_metadata(zf: zipfile.ZipFile, images: list[zipfile.ZipInfo], meta: zipfile.ZipInfo,
                   rel: dict[str, str], limits: IntakeLimits) -> list[_Example]:
    by_name = {unicodedata.normalize("NFC", rel[i.filename]): i for i in images}
    rows: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(_read_text(zf, meta, "bad_metadata").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{meta.filename} line {n}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # bad JSON, an integer past Python's digit limit, deep nesting
            raise IntakeError("bad_metadata", "each line must be a JSON object", [where]) from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise IntakeError("bad_metadata", "each line needs a \"file_name\" string", [where])
        keys = [k for k in CAPTION_KEYS if k in row]
        if len(keys) != 1 or not isinstance(row[keys[0]], str):
            raise IntakeError("bad_metadata", f"each line needs exactly one of {', '.join(CAPTION_KEYS)} "
                              "as a string", [where])
        name = unicodedata.normalize("NFC", row["file_name"])
        if name in rows:
            raise IntakeError("duplicate_name", "an image may be listed once", [rows[name][0], where])
        rows[name] = (where, row[keys[0]])
    unknown = [f"{where} ({name})" for name, (where, _) in rows.items() if name not in by_name]
    if unknown:
        raise IntakeError("bad_metadata", f"{METADATA} names images that are not in the upload", unknown)
    missing = [i.filename for name, i in by_name.items() if name not in rows]
    if missing:
        raise IntakeError("missing_caption", f"images need a {METADATA} line", missing)
    return [_Example(by_name[name], name, _caption(raw, where, limits), where)
            for name, (where, raw) in sorted(rows.items())]


def _plan(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], limits: IntakeLimits) -> tuple[str, list[_Example]]:
    """The layout and its (image, caption) examples, captions read and checked."""
    files = [i for i in infos if not _is_junk(i.filename)]
    if not files:
        raise IntakeError("empty", "upload holds no files", ["upload"])
    rel = _relative_names(files)
    nested = [i.filename for i in files if i.filename.lower().endswith(ARCHIVE_SUFFIXES)]
    if nested:
        raise IntakeError("nested_archive", "archives inside the upload are not allowed", nested)
    allowed = (*IMAGE_SUFFIXES, ".txt")
    other = [i.filename for i in files if not (PurePosixPath(i.filename).suffix.lower() in allowed
                                               or PurePosixPath(i.filename).name == METADATA)]
    if other:
        raise IntakeError("format_not_allowed", f"only images ({', '.join(IMAGE_SUFFIXES)}), .txt captions and "
                          f"{METADATA} are allowed", other)
    deep = [i.filename for i in files if "/" in rel[i.filename]]
    if deep:
        raise IntakeError("bad_layout", "files must sit in one folder (or one top-level folder); "
                          "subfolders are not allowed", deep)
    images = [i for i in files if PurePosixPath(i.filename).suffix.lower() in IMAGE_SUFFIXES]
    captions = [i for i in files if PurePosixPath(i.filename).suffix.lower() == ".txt"]
    if not images:
        raise IntakeError("empty", "upload holds no images", [i.filename for i in files])
    meta = [i for i in files if rel[i.filename] == METADATA]
    if not meta:
        return "captions", _from_caption_files(zf, images, captions, rel, limits)
    if captions:
        raise IntakeError("bad_layout", f"use either {METADATA} or .txt captions, not both",
                          [c.filename for c in captions])
    return "imagefolder", _from_metadata(zf, images, meta[0], rel, limits)


def _write(zf: zipfile.ZipFile, examples: list[_Example], staging: Path, limits: IntakeLimits) -> list[dict]:
    """Decode, check and re-encode every image into ``staging`` beside its caption."""
    entries, stored = [], 0
    for i, ex in enumerate(examples):
        data = read_member(zf, ex.image)
        if is_archive(data):
            raise IntakeError("nested_archive", "archives inside the upload are not allowed", [ex.image.filename])
        image = reencode(ex.image.filename, data, limits)
        stored += len(image.png)
        if stored > limits.max_reencoded_bytes:  # lossless PNG can outgrow the upload many times over
            raise IntakeError("too_large", f"the re-encoded images come to more than "
                              f"max_reencoded_bytes={limits.max_reencoded_bytes} bytes", [ex.image.filename])
        stem = f"{i:05d}"
        (staging / f"{stem}.png").write_bytes(image.png)
        (staging / f"{stem}.txt").write_text(ex.caption + "\n", encoding="utf-8")
        entries.append({"file": f"{stem}.png", "caption_file": f"{stem}.txt", "source": ex.name,
                        "caption_source": ex.caption_source, "source_format": image.source_format,
                        "source_bytes": len(data), "source_sha256": hashlib.sha256(data).hexdigest(),
                        "width": image.width, "height": image.height, "bytes": len(image.png),
                        "sha256": hashlib.sha256(image.png).hexdigest()})
    return entries


@metrics.stage("validate")
def ingest(upload: BinaryIO | str | Path, limits: IntakeLimits, out_dir: str | Path,
           scanner: Detector) -> IntakeResult:
    """Check, re-encode and scan an uploaded dataset zip into ``out_dir`` (which must not exist).

    Raises ``IntakeError`` (a 4xx with reason and offending files) when the upload is refused;
    ``scan.ScanError`` when the scanner fails. Either way nothing is left on disk.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; intake never overwrites a dataset")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        with open_upload(upload, limits) as (f, size), open_archive(f, limits) as (zf, infos):
            layout, examples = _plan(zf, infos, limits)
            entries = _write(zf, examples, staging, limits)
        results = scan_images(scanner, [staging / e["file"] for e in entries])
        for entry, result in zip(entries, results):
            entry["scan"] = result.as_dict()
        screening = judge(scanner, [e["source"] for e in entries], results, limits)
        if screening.status == REJECTED:
            raise screening.refusal(limits)
        status, flagged, ratio = screening.status, screening.flagged, screening.contamination
        record = {"kind": "ftgate.intake-record", "version": 1, "status": status, "layout": layout,
                  "upload_bytes": size, "limits": limits.as_dict(), "scanner": scanner.info(),
                  "images": len(entries), "unsafe_images": len(flagged), "contamination": ratio,
                  "flagged": list(flagged), "ignored": sorted(i.filename for i in infos if _is_junk(i.filename)),
                  "files": entries}
        (staging / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(staging, out_dir)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, IntakeError):
            logger.info("intake refused %s (%d %s): %s", out_dir.name, e.status, e.reason, e)
            metrics.INTAKE_REJECTIONS.labels(e.reason).inc()
        raise
    logger.info("intake %s: %s, %d images, contamination %.3f", out_dir.name, status, len(entries), ratio)
    return IntakeResult(out_dir, status, len(entries), len(flagged), ratio, flagged, layout)


def screen(folder: str | Path, scanner: Detector, limits: IntakeLimits) -> Screening:
    """Scan a dataset ``ingest`` wrote with another detector (the concept of a base model it was not scanned
    for) under the same policy; flagged files are named as in the upload. Raises ``ScanError`` as ingest does."""
    folder = Path(folder)
    entries = json.loads((folder / RECORD).read_text(encoding="utf-8"))["files"]
    results = scan_images(scanner, [folder / e["file"] for e in entries])
    return judge(scanner, [e["source"] for e in entries], results, limits)
