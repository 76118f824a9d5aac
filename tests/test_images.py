"""Camera images are accepted only when complete, 8-bit, gray or BGR, and of a supported size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sdrm import images
from tests.broker import SAMPLES

BOARD = SAMPLES / "ok" / "12100036_temp.jpg"


def encode(image: np.ndarray, suffix: str) -> bytes:
    ok, data = cv2.imencode(suffix, image)
    assert ok
    return data.tobytes()


def test_board_jpeg_decodes_to_gray():
    gray = images.decode_gray(BOARD.read_bytes())
    assert gray.dtype == np.uint8
    assert gray.shape == (640, 640)


def test_colour_png_converted_to_gray():
    board = cv2.imread(str(BOARD), cv2.IMREAD_GRAYSCALE)
    colour = cv2.cvtColor(board, cv2.COLOR_GRAY2BGR)
    assert np.array_equal(images.decode_gray(encode(colour, ".png")), board)


def test_jpeg_padding_after_eoi_accepted():
    data = BOARD.read_bytes() + b"\x00" * 16
    assert images.decode_gray(data).shape == (640, 640)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "0 bytes"),
        ("truncated_jpeg", "end-of-image marker"),
        ("jpeg_without_eoi", "end-of-image marker"),
        ("truncated_png", "IEND"),
        ("garbage", "signature"),
        ("corrupt_jpeg", "could not be decoded"),
        ("bgra_png", "4 channels"),
        ("sixteen_bit_png", "uint16"),
        ("tiny", "outside the supported"),
    ],
)
def test_bad_images_rejected(case, message):
    board = cv2.imread(str(BOARD), cv2.IMREAD_GRAYSCALE)
    jpeg = BOARD.read_bytes()
    png = encode(board, ".png")
    data = {
        "empty": b"",
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "jpeg_without_eoi": jpeg[:-2],
        "truncated_png": png[: len(png) - 5],
        "garbage": b"not an image at all",
        "corrupt_jpeg": images.JPEG_SOI + b"\x00" * 100 + images.JPEG_EOI,
        "bgra_png": encode(cv2.cvtColor(board, cv2.COLOR_GRAY2BGRA), ".png"),
        "sixteen_bit_png": encode(board.astype(np.uint16) * 256, ".png"),
        "tiny": encode(board[:8, :8], ".png"),
    }[case]
    with pytest.raises(images.ImageError, match=message):
        images.decode_gray(data)
