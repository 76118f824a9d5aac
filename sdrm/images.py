"""Decoding and checking of camera images before they reach the model.

A frame is accepted when it is a complete JPEG or PNG file, 8 bits per sample, with 1 (gray) or
3 (BGR) channels, and both sides in [MIN_SIDE, MAX_SIDE] pixels. Colour frames are converted to
grayscale, which the model reads. Everything else raises ImageError with the reason and the fix.

Completeness is checked on the bytes, because decoders fill a cut-off JPEG with gray rows and
return it without an error:
- JPEG starts with the SOI marker FF D8 and ends with the EOI marker FF D9 (zero padding after
  EOI, which some cameras add, is allowed);
- PNG starts with its 8-byte signature and ends with the IEND chunk.
"""

from __future__ import annotations

import cv2
import numpy as np

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND\xaeB`\x82"  # chunk type and CRC of the empty IEND chunk
MIN_SIDE = 16  # pixels; smaller frames carry no inspectable detail at any tile size of the model
MAX_SIDE = 16384  # pixels; bounds a decoded gray frame at 256 MiB (768 MiB while a BGR one is converted)


class ImageError(ValueError):
    """Raised when bytes are not a complete, supported camera image."""


def image_format(data: bytes) -> str | None:
    """Return "jpeg" or "png" from the file signature, else None."""
    if data[:2] == JPEG_SOI:
        return "jpeg"
    if data[:8] == PNG_SIGNATURE:
        return "png"
    return None


def check_complete(data: bytes) -> str:
    """Return the format of data after checking that the file is not cut short; raise ImageError otherwise."""
    if not data:
        raise ImageError("empty image payload (0 bytes): publish a JPEG or PNG file")
    kind = image_format(data)
    if kind is None:
        raise ImageError(f"{len(data)} bytes without a JPEG or PNG signature: publish a JPEG or PNG file")
    if kind == "jpeg" and not data.rstrip(b"\x00").endswith(JPEG_EOI):
        raise ImageError(f"JPEG of {len(data)} bytes has no end-of-image marker (FF D9): the file was cut short")
    if kind == "png" and not data.endswith(PNG_IEND):
        raise ImageError(f"PNG of {len(data)} bytes has no IEND chunk at its end: the file was cut short")
    return kind


def decode_gray(data: bytes) -> np.ndarray:
    """Decode a complete JPEG or PNG to a uint8 grayscale array (H, W), checking depth, channels and size."""
    kind = check_complete(data)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{kind.upper()} of {len(data)} bytes could not be decoded: the file is corrupt")
    if image.dtype != np.uint8:
        raise ImageError(f"image has {image.dtype} samples: publish 8-bit images")

    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in (1, 3):
        raise ImageError(f"image has {channels} channels: publish grayscale (1) or BGR colour (3) images, without alpha")
    gray = image if channels == 1 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)

    height, width = gray.shape
    if min(height, width) < MIN_SIDE or max(height, width) > MAX_SIDE:
        raise ImageError(
            f"image of {width} x {height} pixels is outside the supported {MIN_SIDE}..{MAX_SIDE} pixels per side"
        )
    return gray
