"""Decoding customer images under limits and re-encoding them, so no model sees the original bytes.

The format is decided from the leading bytes (PNG, JPEG and WebP only) and Pillow is asked
to use that one decoder, so a file never reaches a parser we did not allow. The pixel count
is checked from the header before any pixel is decoded (Pillow's own bomb check stays on as
a second line, its global left alone). What survives is re-encoded as a fresh RGB PNG: EXIF
orientation applied, then every chunk of metadata (EXIF, text, ICC, XMP) dropped, because the
new image is built from pixels alone.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .limits import IntakeError, IntakeLimits

FORMAT_MAGIC = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",)}
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
# What broken or hostile image data makes Pillow's decoders raise.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)


@dataclass(frozen=True)
class Reencoded:
    png: bytes
    source_format: str
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or WEBP from the leading bytes; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for fmt, magics in FORMAT_MAGIC.items() if data.startswith(magics)), None)


def reencode(name: str, data: bytes, limits: IntakeLimits) -> Reencoded:
    """Decode one image within ``limits`` and return it as a metadata-free RGB PNG."""
    fmt = sniff_format(data)
    if fmt is None:
        raise IntakeError("format_not_allowed", f"images must be {', '.join(ALLOWED_FORMATS)}", [name])
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise IntakeError("decompression_bomb", f"image exceeds Pillow's decompression-bomb limit ({e}); "
                          f"max_image_pixels={limits.max_image_pixels}", [name]) from None
    except DECODE_ERRORS as e:
        raise IntakeError("bad_image", f"image cannot be decoded as {fmt} ({e})", [name]) from None
    with image:
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise IntakeError("decompression_bomb", f"image is {width}x{height} = {width * height} pixels, more "
                              f"than max_image_pixels={limits.max_image_pixels}", [name])
        if getattr(image, "n_frames", 1) > 1:
            raise IntakeError("format_not_allowed", "animated images are not allowed", [name])
        try:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
        except DECODE_ERRORS as e:
            raise IntakeError("bad_image", f"image cannot be decoded as {fmt} ({e})", [name]) from None
    clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())  # pixels only: no info, no metadata
    out = io.BytesIO()
    clean.save(out, format="PNG")
    return Reencoded(out.getvalue(), fmt, clean.width, clean.height)
