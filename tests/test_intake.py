"""Dataset intake: every malformed upload gets the right 4xx and leaves nothing; good ones come out clean."""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from auditing.config import ConfigError, json_schema
from auditing.detectors.base import Detector, DetectorResult
from auditing.detectors.registry import load_detector
from auditing.layouts import load_examples
from auditing.models.hashing import sha256_file
from auditing.shapes import datasets
from auditing.shapes.scene import Concept
from gate.intake import REASONS, IntakeError, IntakeLimits, ScanError, ingest
from gate.intake.limits import printable
from gate.intake.scan import judge

skimage_data = pytest.importorskip("skimage.data")
UNSAFE = Concept("red", "triangle")
ZEROS_50MB = 50 << 20


class RedScanner(Detector):
    """Fake scanner: an image is unsafe when most of its pixels are pure red."""

    name = "red"
    version = "1"
    rule = "share of pure red pixels > 0.5"

    def detect(self, images):
        results = []
        for image in images:
            a = np.asarray(image)
            share = float(np.mean((a[..., 0] == 255) & (a[..., 1] == 0) & (a[..., 2] == 0)))
            results.append(DetectorResult(share, share > 0.5, {"labels": {"red": share}}))
        return results


class BrokenScanner(Detector):
    name = "broken"

    def detect(self, images):
        return [DetectorResult(None, None, error="model failed") for _ in images]


# --- building uploads ---------------------------------------------------------------------------------------

def png(colour=(30, 90, 200), size=(16, 16), **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG", **save)
    return buf.getvalue()


def jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, **save)
    return buf.getvalue()


def make_zip(members, compression=zipfile.ZIP_DEFLATED) -> bytes:
    """Zip of (name or ZipInfo, bytes) pairs, in order (duplicates allowed)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", compression) as z:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name"
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def pair(stem="a", caption="a blue square", image=None) -> list[tuple[str, bytes]]:
    return [(f"{stem}.png", png() if image is None else image), (f"{stem}.txt", caption.encode())]


def entry(name: str, mode: int, data: bytes = b"x",
          compress_type=zipfile.ZIP_DEFLATED) -> tuple[zipfile.ZipInfo, bytes]:
    """A member with unix ``mode`` bits (file type included) and a chosen compression method."""
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    info.compress_type = compress_type
    return info, data


def patch(data: bytes, name: str, central: dict[int, tuple[str, int]], local: dict[int, tuple[str, int]]) -> bytes:
    """Overwrite fields of ``name``'s central-directory entry and local header (offset -> (struct fmt, value))."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo(name)
        pos = z.start_dir
    while out[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", out, pos + 28)
        if out[pos + 46:pos + 46 + n].decode() == name:
            for offset, (fmt, value) in central.items():
                struct.pack_into(fmt, out, pos + offset, value)
        pos += 46 + n + m + k
    for offset, (fmt, value) in local.items():
        struct.pack_into(fmt, out, info.header_offset + offset, value)
    return bytes(out)


@functools.cache
def zeros_zip(size: int) -> bytes:
    return make_zip([("a.png", bytes(size)), ("a.txt", b"zeros")])


def lying_size() -> bytes:
    return patch(zeros_zip(ZEROS_50MB), "a.png", {24: ("<I", 1000)}, {22: ("<I", 1000)})


def encrypted() -> bytes:
    data = make_zip(pair("secret"))
    return patch(data, "secret.png", {8: ("<H", 0x1)}, {6: ("<H", 0x1)})


def overlapping() -> bytes:
    data = make_zip(pair("a") + pair("b"))
    return patch(data, "b.png", {42: ("<I", 0)}, {})


def bad_crc() -> bytes:
    data = bytearray(make_zip(pair("a", caption="a caption"), compression=zipfile.ZIP_STORED))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo("a.txt")
    data[info.header_offset + 30 + len("a.txt")] ^= 0xFF  # first byte of the stored caption
    return bytes(data)


def huge_ihdr(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width`` x ``height``."""
    data = bytearray(png())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    struct.pack_into(">II", ihdr, 4, width, height)
    data[12:29] = ihdr
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(ihdr)))
    return bytes(data)


def animated_png() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def other_format(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "green").save(buf, format=fmt)
    return buf.getvalue()


def tar_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("empty.txt"))
    return buf.getvalue()


def metadata(*rows) -> tuple[str, bytes]:
    return "metadata.jsonl", "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


# --- the malformed uploads -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], bytes]
    status: int
    reason: str
    file: str  # named in the message and in ``files``
    limit: str | None = None  # named in the message
    limits: dict = field(default_factory=dict)


def good() -> bytes:
    return make_zip(pair("a") + pair("b"))


RED = png((255, 0, 0))
CASES = [
    Case("upload-too-large", good, 413, "too_large", "upload", "max_upload_bytes", {"max_upload_bytes": 100}),
    Case("not-a-zip", lambda: os.urandom(2000), 400, "not_a_zip", "upload"),
    Case("empty-upload", lambda: b"", 400, "not_a_zip", "upload"),
    Case("truncated-zip", lambda: good()[:-30], 400, "not_a_zip", "upload"),
    Case("too-many-files", good, 413, "too_many_files", "upload", "max_files", {"max_files": 3}),
    Case("dotdot", lambda: make_zip([("../evil.png", png()), *pair()]), 400, "zip_slip", "../evil.png"),
    Case("absolute", lambda: make_zip([("/tmp/evil.png", png()), *pair()]), 400, "zip_slip", "/tmp/evil.png"),
    Case("inner-dotdot", lambda: make_zip([("d/../../evil.png", png())]), 400, "zip_slip", "d/../../evil.png"),
    Case("backslash", lambda: make_zip([("..\\evil.png", png())]), 400, "zip_slip", "..\\evil.png"),
    Case("drive-letter", lambda: make_zip([("C:/evil.png", png())]), 400, "zip_slip", "C:/evil.png"),
    Case("control-char-name", lambda: make_zip([("a\x1b.png", png())]), 400, "bad_name", "a\x1b.png"),
    Case("empty-component", lambda: make_zip([("d//a.png", png())]), 400, "bad_name", "d//a.png"),
    Case("symlink", lambda: make_zip([entry("link.png", stat.S_IFLNK | 0o777, b"/etc/passwd"), *pair()]),
         400, "symlink", "link.png"),
    Case("fifo", lambda: make_zip([entry("pipe.png", stat.S_IFIFO | 0o644), *pair()]), 400, "special_file",
         "pipe.png"),
    Case("encrypted", encrypted, 415, "encrypted", "secret.png"),
    Case("bzip2", lambda: make_zip([entry("b.png", 0o100644, png(), zipfile.ZIP_BZIP2)]), 415,
         "format_not_allowed", "b.png", "stored, deflated"),
    Case("duplicate-name", lambda: make_zip(pair("a") + pair("a")), 400, "duplicate_name", "a.png"),
    Case("case-duplicate", lambda: make_zip(pair("a") + [("A.PNG", png())]), 400, "duplicate_name", "A.PNG"),
    Case("stem-collision", lambda: make_zip(pair("a") + [("a.jpg", jpeg(Image.new("RGB", (8, 8))))]), 400,
         "duplicate_name", "a.jpg"),
    Case("bomb-lying-size", lying_size, 413, "zip_bomb", "a.png", "declared size of 1000"),
    Case("bomb-honest-size", lambda: zeros_zip(ZEROS_50MB), 413, "zip_bomb", "a.png", "max_member_bytes"),
    Case("bomb-ratio", lambda: zeros_zip(5 << 20), 413, "zip_bomb", "a.png", "max_compression_ratio"),
    Case("bomb-total", lambda: make_zip([("a.png", os.urandom(6000)), ("b.png", os.urandom(6000))]), 413,
         "zip_bomb", "b.png", "max_extracted_bytes", {"max_extracted_bytes": 10_000}),
    Case("reencoded-total", lambda: make_zip(pair("a") + pair("b", image=jpeg(Image.effect_noise((64, 64), 80)))),
         413, "too_large", "b.png", "max_reencoded_bytes", {"max_reencoded_bytes": 3000}),
    Case("bomb-overlap", overlapping, 413, "zip_bomb", "b.png", "overlap"),
    Case("nested-zip-name", lambda: make_zip([*pair(), ("more.zip", good())]), 415, "nested_archive",
         "more.zip"),
    Case("nested-tar-name", lambda: make_zip([*pair(), ("more.tar.gz", b"x")]), 415, "nested_archive",
         "more.tar.gz"),
    Case("nested-zip-magic-image", lambda: make_zip(pair("a", image=good())), 415, "nested_archive", "a.png"),
    Case("nested-gzip-magic-caption", lambda: make_zip([("a.png", png()), ("a.txt", gzip.compress(b"caption"))]), 415,
         "nested_archive", "a.txt"),
    Case("nested-tar-magic-caption", lambda: make_zip([("a.png", png()), ("a.txt", tar_bytes())]), 415,
         "nested_archive", "a.txt"),
    Case("file-type", lambda: make_zip([*pair(), ("notes.pdf", b"%PDF-1.4")]), 415, "format_not_allowed",
         "notes.pdf", ".png"),
    Case("gif-named-png", lambda: make_zip(pair("a", image=other_format("GIF"))), 415, "format_not_allowed",
         "a.png", "PNG, JPEG, WEBP"),
    Case("bmp-named-jpg", lambda: make_zip([("a.jpg", other_format("BMP")), ("a.txt", b"cap")]), 415,
         "format_not_allowed", "a.jpg", "PNG, JPEG, WEBP"),
    Case("text-named-png", lambda: make_zip(pair("a", image=b"hello")), 415, "format_not_allowed", "a.png"),
    Case("animated-png", lambda: make_zip(pair("a", image=animated_png())), 415, "format_not_allowed", "a.png",
         "animated"),
    Case("subfolder", lambda: make_zip([("d/a.png", png()), ("d/a.txt", b"c"), ("d/e/b.png", png())]), 400,
         "bad_layout", "d/e/b.png"),
    Case("mixed-layouts", lambda: make_zip([*pair(), metadata({"file_name": "a.png", "text": "c"})]), 400,
         "bad_layout", "a.txt", "metadata.jsonl"),
    Case("folders-only", lambda: make_zip([("d/", b""), ("d/e/", b"")]), 400, "empty", "upload"),
    Case("junk-only", lambda: make_zip([("__MACOSX/._a.png", b"x"), (".DS_Store", b"x")]), 400, "empty",
         "upload"),
    Case("captions-only", lambda: make_zip([("a.txt", b"caption")]), 400, "empty", "a.txt"),
    Case("missing-caption", lambda: make_zip([*pair(), ("b.png", png())]), 400, "missing_caption", "b.png",
         ".txt"),
    Case("orphan-caption", lambda: make_zip([*pair(), ("c.txt", b"c")]), 400, "orphan_caption", "c.txt"),
    Case("caption-too-long", lambda: make_zip(pair(caption="x" * 11)), 400, "caption_too_long", "a.txt",
         "max_caption_chars=10", {"max_caption_chars": 10}),
    Case("caption-not-utf8", lambda: make_zip([("a.png", png()), ("a.txt", b"\xff\xfecaption")]), 400,
         "bad_caption", "a.txt", "UTF-8"),
    Case("caption-control-char", lambda: make_zip(pair(caption="a \x07 bell")), 400, "bad_caption", "a.txt"),
    Case("caption-empty", lambda: make_zip(pair(caption="  \n")), 400, "empty_caption", "a.txt",
         "allow_empty_captions"),
    Case("corrupt-png", lambda: make_zip(pair(image=png()[:8] + os.urandom(200))), 400, "bad_image", "a.png"),
    Case("truncated-jpeg", lambda: make_zip([("a.jpg", jpeg(Image.effect_noise((64, 64), 50))[:400]),
                                             ("a.txt", b"c")]), 400, "bad_image", "a.jpg"),
    Case("too-many-pixels", lambda: make_zip(pair(image=png(size=(64, 64)))), 413, "decompression_bomb",
         "a.png", "max_image_pixels=1000", {"max_image_pixels": 1000}),
    Case("pillow-bomb", lambda: make_zip(pair(image=huge_ihdr(30000, 30000))), 413, "decompression_bomb",
         "a.png", "max_image_pixels", {"max_image_pixels": 10**9}),
    Case("corrupt-crc", bad_crc, 400, "corrupt_zip", "a.txt"),
    Case("metadata-not-json", lambda: make_zip([("a.png", png()), metadata("{not json")]), 400, "bad_metadata",
         "metadata.jsonl line 1"),
    Case("metadata-no-file-name", lambda: make_zip([("a.png", png()), metadata({"text": "c"})]), 400,
         "bad_metadata", "metadata.jsonl line 1", "file_name"),
    Case("metadata-two-captions", lambda: make_zip([("a.png", png()),
                                                    metadata({"file_name": "a.png", "text": "c", "caption": "d"})]),
         400, "bad_metadata", "metadata.jsonl line 1", "text, caption"),
    Case("metadata-absent-image", lambda: make_zip([("a.png", png()), metadata(
        {"file_name": "a.png", "text": "c"}, {"file_name": "z.png", "text": "c"})]), 400, "bad_metadata", "z.png"),
    Case("metadata-missing-row", lambda: make_zip([("a.png", png()), ("b.png", png()), metadata(
        {"file_name": "a.png", "text": "c"})]), 400, "missing_caption", "b.png", "metadata.jsonl"),
    Case("metadata-duplicate-row", lambda: make_zip([("a.png", png()), metadata(
        {"file_name": "a.png", "text": "c"}, "", {"file_name": "a.png", "text": "d"})]), 400, "duplicate_name",
         "metadata.jsonl line 3"),
    Case("contaminated", lambda: make_zip(pair("a", image=RED) + pair("b", image=RED) + pair("c")), 422,
         "contaminated", "b.png", "with 95% confidence more than contamination_reject_ratio=0.1"),
]


def test_cases_cover_every_reason_and_are_many():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert {c.reason for c in CASES} == set(REASONS)
    assert set(REASONS.values()) == {400, 413, 415, 422}


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not any(out.parent.iterdir()), sorted(p.name for p in out.parent.iterdir())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_upload_is_refused_and_leaves_nothing(case, tmp_path):
    out = tmp_path / "datasets" / "job-1"
    with pytest.raises(IntakeError) as caught:
        ingest(io.BytesIO(case.build()), IntakeLimits(**case.limits), out, RedScanner())
    e = caught.value
    assert (e.status, e.reason) == (case.status, case.reason), str(e)
    assert any(case.file in f for f in e.files) and printable(case.file) in str(e)
    if case.limit:
        assert case.limit in str(e)
    assert e.as_dict()["status"] == case.status
    _assert_nothing_left(out)


def test_file_names_cannot_forge_log_lines(tmp_path, caplog):
    forged = "a.png\n2026-12-01 00:00:00 INFO gate.api.jobs: job 1 released\x1b[2K"
    with caplog.at_level("INFO", logger="gate.intake"), pytest.raises(IntakeError) as caught:
        ingest(io.BytesIO(make_zip([(forged, png())])), IntakeLimits(), tmp_path / "datasets" / "d", RedScanner())
    assert caught.value.files == [forged]  # the JSON body keeps the real name; JSON escapes it
    [record] = [r for r in caplog.records if r.name == "gate.intake.dataset"]
    line = record.getMessage()
    assert "\n" not in line and "\x1b" not in line
    assert "a.png\\n2026-12-01" in line and "\\x1b[2K" in line


# --- limits --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("bad", "message"), [
    ({"max_files": 0}, "max_files must be greater than or equal to 1 (got 0)"),
    ({"max_upload_bytes": -1}, "max_upload_bytes must be greater than or equal to 1 (got -1)"),
    ({"max_image_pixels": 2.5}, "max_image_pixels must be a valid integer (got 2.5)"),
    ({"max_caption_chars": True}, "max_caption_chars must be a valid integer (got True)"),
    ({"contamination_flag_ratio": 1.5}, "contamination_flag_ratio must be less than or equal to 1 (got 1.5)"),
    ({"contamination_reject_ratio": "0.1"}, "contamination_reject_ratio must be a valid number (got '0.1')"),
    ({"max_compression_ratio": 0.5}, "max_compression_ratio must be greater than or equal to 1 (got 0.5)"),
    ({"allow_empty_captions": 1}, "allow_empty_captions must be a valid boolean (got 1)"),
])
def test_bad_limits_name_the_field(bad, message):
    (name,) = bad
    with pytest.raises(ConfigError) as info:
        IntakeLimits(**bad)
    assert (info.value.field, str(info.value)) == (name, message)


def test_flag_ratio_may_not_exceed_reject_ratio():
    with pytest.raises(ConfigError) as info:
        IntakeLimits(contamination_flag_ratio=0.5, contamination_reject_ratio=0.2)
    assert info.value.field == "contamination_flag_ratio"
    assert str(info.value) == "contamination_flag_ratio (0.5) must not exceed contamination_reject_ratio (0.2)"


def test_the_limits_schema_publishes_their_bounds():
    properties = json_schema(IntakeLimits)["properties"]
    assert (properties["max_files"]["minimum"], properties["max_compression_ratio"]["minimum"]) == (1, 1.0)
    assert (properties["contamination_reject_ratio"]["minimum"], properties["contamination_reject_ratio"]["maximum"]) \
        == (0.0, 1.0)
    assert properties["allow_empty_captions"]["type"] == "boolean"


# --- accepted uploads ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "data"
    datasets.write_world_data(out, UNSAFE, seed=0, dataset_size=16, contamination=(0.25,))
    return out / "datasets"


@pytest.fixture(scope="module")
def nudenet():
    return load_detector("nudenet")


def zip_folder(folder: Path, prefix: str = "", extra=()) -> bytes:
    return make_zip([(prefix + p.name, p.read_bytes()) for p in sorted(folder.iterdir())] + list(extra))


def _source_captions(folder: Path) -> dict[str, str]:
    meta = folder / "metadata.jsonl"
    if meta.exists():
        return {r["file_name"]: r["text"] for r in map(json.loads, meta.read_text().splitlines())}
    return {p.with_suffix(".png").name: p.read_text().strip() for p in folder.glob("*.txt")}


@pytest.mark.parametrize("layout,prefix", [("captions", ""), ("imagefolder", "imagefolder/")])
def test_both_shapes_world_layouts_are_accepted(world, nudenet, tmp_path, layout, prefix):
    source = world / "benign" / layout
    junk = [("__MACOSX/._00000.png", b"\0\5\26\7"), (f"{prefix}.DS_Store", b"\0")]
    upload = tmp_path / "upload.zip"
    upload.write_bytes(zip_folder(source, prefix, junk))
    result = ingest(upload, IntakeLimits(), tmp_path / "out", nudenet)

    assert (result.status, result.images, result.contamination, result.layout) == ("accepted", 16, 0.0, layout)
    record = json.loads((result.folder / "intake.json").read_text())
    assert record["status"] == "accepted" and record["scanner"]["name"] == "nudenet"
    assert record["limits"] == IntakeLimits().as_dict()
    assert sorted(record["ignored"]) == sorted(name for name, _ in junk)
    captions = _source_captions(source)
    examples = load_examples(result.folder)  # what training reads
    assert len(examples) == 16
    for f, (image, caption) in zip(record["files"], examples):
        assert caption == captions[f["source"]]
        assert f["source_sha256"] == sha256_file(source / f["source"])
        assert f["sha256"] == sha256_file(result.folder / f["file"])
        assert f["scan"]["unsafe"] is False and "labels" in f["scan"]["raw"]
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(source / f["source"]).convert("RGB")))
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_shapes_world_contamination_is_flagged_or_refused_by_a_real_detector(world, tmp_path):
    """The world's own concept detector as scanner: a quarter of the images show the unsafe concept."""
    scanner = load_detector("shapes", concept=UNSAFE.name)
    limits = IntakeLimits(contamination_flag_ratio=0.1, contamination_reject_ratio=0.5)
    flagged = ingest(io.BytesIO(zip_folder(world / "contaminated-0.25" / "captions")), limits, tmp_path / "a",
                     scanner)
    assert (flagged.status, flagged.unsafe_images, flagged.contamination) == ("flagged", 4, 0.25)
    assert len(flagged.flagged) == 4 and all(name.endswith(".png") for name in flagged.flagged)
    with pytest.raises(IntakeError) as caught:
        ingest(io.BytesIO(zip_folder(world / "harmful" / "imagefolder")), limits, tmp_path / "b", scanner)
    assert (caught.value.status, caught.value.reason, len(caught.value.files)) == (422, "contaminated", 16)
    assert not (tmp_path / "b").exists()


def test_real_photographs_scan_clean_with_nudenet(nudenet, tmp_path):
    samples = Path(skimage_data.data_dir)
    photos = ["astronaut.png", "coffee.png", "chelsea.png"]
    members = []
    for name in photos:
        members += [(name, (samples / name).read_bytes()), (name.replace(".png", ".txt"), b"a photograph")]
    members.append(("camera.jpg", jpeg(Image.open(samples / "camera.png"))))
    members.append(("camera.txt", b"a photographer"))
    result = ingest(io.BytesIO(make_zip(members)), IntakeLimits(), tmp_path / "out", nudenet)
    assert (result.status, result.images, result.unsafe_images, result.contamination) == ("accepted", 4, 0, 0.0)
    assert result.flagged == ()


@pytest.mark.parametrize("reject,flag,status", [(0.5, 0.3, "accepted"), (0.5, 0.2, "flagged"),
                                                (0.25, 0.25, "accepted"), (0.25, 0.0, "flagged"),
                                                (0.2, 0.0, "flagged"), (1.0, 0.0, "flagged"),
                                                (0.01, 0.0, None), (0.0, 0.0, None)])
def test_contamination_policy_thresholds(tmp_path, reject, flag, status):
    """One red image in four: the share 0.25 is compared strictly with the flag ratio, its one-sided 95% lower
    bound (1 - 0.95 ** (1 / 4) = 0.0127) strictly with the reject ratio: 0.25 > 0.2 only flags."""
    upload = make_zip(pair("r", image=RED) + pair("a") + pair("b") + pair("c"))
    limits = IntakeLimits(contamination_flag_ratio=flag, contamination_reject_ratio=reject)
    out = tmp_path / "out"
    if status is None:
        with pytest.raises(IntakeError, match="r.png") as caught:
            ingest(io.BytesIO(upload), limits, out, RedScanner())
        assert (caught.value.status, caught.value.files) == (422, ["r.png"])
        assert caught.value.message == ("1 of 4 images (25.0%) are unsafe: with 95% confidence more than "
                                        f"contamination_reject_ratio={reject:g}")
        return _assert_nothing_left(out)
    result = ingest(io.BytesIO(upload), limits, out, RedScanner())
    assert (result.status, result.contamination) == (status, 0.25)
    assert result.flagged == ("r.png",)
    record = json.loads((out / "intake.json").read_text())
    assert record["status"] == status and record["flagged"] == ["r.png"]


def test_one_false_positive_in_a_small_benign_set_is_flagged_not_refused(tmp_path):
    """The load benchmark's case: 1 of 8 (12.5%) is above the default reject ratio 0.1, but its lower bound
    (0.0064) is not, so a reviewer decides."""
    upload = make_zip(pair("fp", image=RED) + [m for name in "abcdefg" for m in pair(name)])
    result = ingest(io.BytesIO(upload), IntakeLimits(), tmp_path / "out", RedScanner())
    assert (result.status, result.images, result.unsafe_images, result.flagged) == ("flagged", 8, 1, ("fp.png",))


def _fewest_refused(images: int, ratio: str) -> int | None:
    """The fewest unsafe images whose one-sided 95% lower bound is above ``ratio``, computed apart from
    auditing.stats: the bound is above r exactly when P(X >= k | n, r) < 0.05, summed here in exact fractions."""
    r, tail, fewest = Fraction(ratio), Fraction(0), None
    for k in range(images, -1, -1):
        tail += comb(images, k) * r ** k * (1 - r) ** (images - k)  # now P(X >= k)
        if tail >= Fraction(5, 100):
            return fewest
        fewest = k
    return fewest


@pytest.mark.parametrize("images,ratio,fewest", [(8, "0.1", 3), (20, "0.1", 5), (64, "0.5", 40), (200, "0.3", 72),
                                                 (16, "0", 1), (16, "1", None)])
def test_refusal_starts_where_the_lower_bound_passes_the_reject_ratio(images, ratio, fewest):
    """Refused from the exact tail's boundary on (never at ratio 1, from the first unsafe image at ratio 0), flagged
    just below it, accepted with no unsafe image."""
    assert _fewest_refused(images, ratio) == fewest
    limits = IntakeLimits(contamination_reject_ratio=float(ratio))
    for unsafe in sorted({0, 1, images} | ({fewest - 1, fewest} if fewest else set())):
        results = [DetectorResult(1.0, i < unsafe) for i in range(images)]
        screening = judge(RedScanner(), [f"{i}.png" for i in range(images)], results, limits)
        refused = fewest is not None and unsafe >= fewest
        assert screening.status == ("rejected" if refused else "flagged" if unsafe else "accepted"), unsafe
        assert screening.as_dict()["contamination_lower"] == screening.contamination_lower
        assert (screening.contamination_lower > 0) == (unsafe > 0) and screening.contamination_lower < 1



def test_the_demos_contaminated_set_is_flagged_at_its_reject_ratio_and_refused_at_the_default():
    """gate.demo relies on it: 19 of 64 unsafe (lower bound 0.20) waits for a reviewer at 0.5, is refused at 0.1."""
    from gate.demo import DATASET_IMAGES, DATASETS, REJECT_RATIO

    unsafe = round(DATASET_IMAGES * DATASETS["contaminated"])
    results = [DetectorResult(1.0, i < unsafe) for i in range(DATASET_IMAGES)]
    sources = [f"{i}.png" for i in range(DATASET_IMAGES)]
    assert judge(RedScanner(), sources, results, IntakeLimits(contamination_reject_ratio=REJECT_RATIO)).status \
        == "flagged"
    assert judge(RedScanner(), sources, results, IntakeLimits()).status == "rejected"

def test_reencoding_strips_metadata(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "secret text chunk")
    exif = Image.Exif()
    exif[0x010E] = "secret exif description"
    photo = Image.effect_noise((32, 24), 40).convert("RGB")
    upload = make_zip([("a.png", png(pnginfo=info)), ("a.txt", b"a"),
                       ("b.jpg", jpeg(photo, exif=exif.tobytes(), comment=b"secret")), ("b.txt", b"b")])
    result = ingest(io.BytesIO(upload), IntakeLimits(), tmp_path / "out", RedScanner())
    for name in ("00000.png", "00001.png"):
        data = (result.folder / name).read_bytes()
        assert b"secret" not in data
        chunks, pos = [], 8
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            chunks.append(data[pos + 4:pos + 8])
            pos += 12 + length
        assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
        with Image.open(result.folder / name) as image:
            assert image.format == "PNG" and image.mode == "RGB" and not image.getexif()


def test_jpeg_comes_out_as_png_with_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), 8, 0), 8, 1)
    original = Image.fromarray(smooth)
    data = jpeg(original, subsampling=0)
    upload = make_zip([("x.jpeg", data), ("x.txt", b"blocks")])
    result = ingest(io.BytesIO(upload), IntakeLimits(), tmp_path / "out", RedScanner())
    out = np.asarray(Image.open(result.folder / "00000.png"))
    assert np.array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))  # lossless from decode
    assert np.abs(out.astype(int) - smooth).mean() < 4  # and close to what the customer encoded
    record = json.loads((result.folder / "intake.json").read_text())
    assert record["files"][0]["source_format"] == "JPEG"


def test_exif_orientation_is_applied_before_metadata_is_dropped(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    upload = make_zip([("a.jpg", jpeg(Image.new("RGB", (40, 20), "blue"), exif=exif.tobytes())), ("a.txt", b"a")])
    result = ingest(io.BytesIO(upload), IntakeLimits(), tmp_path / "out", RedScanner())
    assert Image.open(result.folder / "00000.png").size == (20, 40)


def test_imagefolder_accepts_the_caption_key_and_webp(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="WEBP", lossless=True)
    upload = make_zip([("w.webp", buf.getvalue()),
                       metadata({"file_name": "w.webp", "caption": " a white square ", "extra": 1})])
    result = ingest(io.BytesIO(upload), IntakeLimits(), tmp_path / "out", RedScanner())
    assert result.layout == "imagefolder"
    assert load_examples(result.folder)[0][1] == "a white square"


class _Stream(io.RawIOBase):
    """A non-seekable upload, as a raw request body is."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        return self._buf.readinto(b)


def test_non_seekable_streams_are_spooled_and_capped(tmp_path):
    result = ingest(_Stream(good()), IntakeLimits(), tmp_path / "ok", RedScanner())
    assert result.images == 2
    with pytest.raises(IntakeError, match="max_upload_bytes") as caught:
        ingest(_Stream(good()), IntakeLimits(max_upload_bytes=100), tmp_path / "big", RedScanner())
    assert caught.value.status == 413
    assert not (tmp_path / "big").exists()


def test_an_existing_output_folder_is_never_touched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ingest(io.BytesIO(good()), IntakeLimits(), out, RedScanner())
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "mine"


def test_a_scanner_failure_fails_closed_and_leaves_nothing(tmp_path):
    out = tmp_path / "datasets" / "job"
    with pytest.raises(ScanError, match="00000.png"):
        ingest(io.BytesIO(good()), IntakeLimits(), out, BrokenScanner())
    _assert_nothing_left(out)
