"""From a camera frame to a defect verdict: tiling, normalisation and the frame decision.

A frame larger than the model input is cut into tiles of `input_size` pixels at `tile_stride`.
Tiles overlap when the stride is smaller than the tile, and the last row and column of tiles are
aligned to the frame's edge so that every pixel is covered. The b tiles form the batch of
X (b, t, d) and are factorised together. A frame is a defect when any tile's defect probability
reaches the threshold; its score is the largest tile probability.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from sdrm.checkpoint import normalize


@dataclass(frozen=True)
class Tile:
    """A flagged or scored tile in frame pixels."""

    x: int
    y: int
    w: int
    h: int
    score: float


@dataclass
class FramePrediction:
    """The frame decision and every tile's score, in frame pixel coordinates."""

    label: str
    score: float
    threshold: float
    tiles: list[Tile]
    flagged: list[Tile] = field(default_factory=list)


def tile_origins(width: int, height: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """Return the (x, y) top-left corners of tiles covering a width x height frame, row by row."""
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be >= 1, got {tile} and {stride}")

    def starts(extent: int) -> list[int]:
        if extent <= tile:
            return [0]
        positions = list(range(0, extent - tile + 1, stride))
        if positions[-1] != extent - tile:
            positions.append(extent - tile)
        return positions

    return [(x, y) for y in starts(height) for x in starts(width)]


def frame_to_tiles(gray: np.ndarray, manifest: dict) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """Return normalised model inputs (b, 1, s, s) and each input's (x, y, w, h) in the frame.

    gray: uint8 (H, W). `frame_mode` "resize" maps the whole frame onto one input. "tile" (the
    default) cuts tiles of input_size at tile_stride, and a frame smaller than one tile is resized
    to one input.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"frame must be a uint8 grayscale array (H, W), got {gray.dtype} {gray.shape}")
    size = int(manifest["input_size"])
    height, width = gray.shape
    mode = manifest.get("frame_mode", "tile")

    if mode == "resize" or (height <= size and width <= size):
        image = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA) if gray.shape != (size, size) else gray
        batch = torch.from_numpy(np.ascontiguousarray(image))[None, None]
        return normalize(batch, manifest), [(0, 0, width, height)]

    if height < size or width < size:
        scale = size / min(height, width)
        gray = cv2.resize(gray, (max(size, round(width * scale)), max(size, round(height * scale))))
        height, width = gray.shape

    stride = int(manifest.get("tile_stride", size // 2))
    origins = tile_origins(width, height, size, stride)
    tiles = np.stack([gray[y : y + size, x : x + size] for x, y in origins])
    batch = torch.from_numpy(tiles)[:, None]
    return normalize(batch, manifest), [(x, y, size, size) for x, y in origins]


def decide(scores: np.ndarray, boxes: list[tuple[int, int, int, int]], threshold: float) -> FramePrediction:
    """Return the frame prediction from per-tile defect probabilities."""
    tiles = [Tile(x, y, w, h, float(score)) for (x, y, w, h), score in zip(boxes, scores)]
    flagged = [tile for tile in tiles if tile.score >= threshold]
    score = float(np.max(scores)) if len(scores) else 0.0
    return FramePrediction("defect" if flagged else "ok", score, threshold, tiles, flagged)


@torch.no_grad()
def predict_frame(model: torch.nn.Module, manifest: dict, gray: np.ndarray, phi: float | None = ...) -> FramePrediction:  # type: ignore[assignment]
    """Run the whole model on one frame (all its tiles factorised together) and decide."""
    inputs, boxes = frame_to_tiles(gray, manifest)
    if phi is ...:
        logits = model(inputs)
    else:
        logits = model(inputs, phi=phi)
    scores = torch.softmax(logits, dim=-1)[:, 1].numpy()
    return decide(scores, boxes, float(manifest.get("frame_threshold", manifest["threshold"])))
