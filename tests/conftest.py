"""Shared fixtures: real token matrices cut from the inspection images in the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

PATCH = 16
IMAGE_SIDE = 224
EMBED_DIM = 768
EMBED_SEED = 1234

# One data set of each kind: PCB board photos (640 x 640 JPEG), PCB defect crops (128 x 128 PNG)
# and electroluminescence images of solar cells (300 x 300 PNG).
IMAGE_SETS = {
    "boards": "deeppcb-boards/defective/*.jpg",
    "defect": "deeppcb/defect/*.png",
    "elpv": "elpv/ok/*.png",
}


def data_root() -> Path:
    """Return the shared data folder: $SDRM_DATA, else shared/data beside the repository."""
    override = os.environ.get("SDRM_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def read_gray(path: Path) -> np.ndarray:
    """Read an image file as a uint8 grayscale array at its own resolution."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return image


def resize_gray(image: np.ndarray) -> np.ndarray:
    """Resize a grayscale image to the 224 x 224 ViT input."""
    import cv2

    return cv2.resize(image, (IMAGE_SIDE, IMAGE_SIDE), interpolation=cv2.INTER_AREA)


def embed_tokens(image: np.ndarray) -> torch.Tensor:
    """Embed a 224 x 224 grayscale image as 196 x 768 layer-normalised patch tokens (float32).

    Each 16 x 16 patch becomes 256 pixels in [0, 1], projected to 768 features by a fixed random
    matrix scaled by 1/16. Every token is then centred and divided by its standard deviation
    + 1e-6, as a layer norm does: raw pixel tokens are dominated by their mean and have rank 1.
    """
    pixels = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32) / 255.0
    side = pixels.shape[0] // PATCH
    patches = pixels.reshape(side, PATCH, side, PATCH).permute(0, 2, 1, 3).reshape(side * side, PATCH * PATCH)
    generator = torch.Generator().manual_seed(EMBED_SEED)
    projection = torch.randn(PATCH * PATCH, EMBED_DIM, generator=generator) / 16.0
    tokens = patches @ projection
    tokens = tokens - tokens.mean(dim=1, keepdim=True)
    return tokens / (tokens.std(dim=1, keepdim=True) + 1e-6)


def head_slice(tokens: torch.Tensor, head: int, head_dim: int) -> torch.Tensor:
    """Return the feature columns [head * head_dim, (head + 1) * head_dim) of a token matrix."""
    return tokens[:, head * head_dim : (head + 1) * head_dim].contiguous()


def cut_tiles(image: np.ndarray, grid: int = 3) -> list[np.ndarray]:
    """Cut a grid x grid set of overlapping 224 x 224 tiles from an image of at least that size."""
    height, width = image.shape
    tops = np.linspace(0, height - IMAGE_SIDE, grid).astype(int)
    lefts = np.linspace(0, width - IMAGE_SIDE, grid).astype(int)
    return [image[top : top + IMAGE_SIDE, left : left + IMAGE_SIDE] for top in tops for left in lefts]


def shift_image(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Shift an image by (dx, dy) >= 0 pixels and repeat the edge, as a camera moving slightly."""
    shifted = np.roll(image, shift=(dy, dx), axis=(0, 1))
    if dy > 0:
        shifted[:dy, :] = shifted[dy : dy + 1, :]
    if dx > 0:
        shifted[:, :dx] = shifted[:, dx : dx + 1]
    return shifted


@pytest.fixture(scope="session")
def full_images() -> dict[str, list[np.ndarray]]:
    """The first three grayscale images of each data set at their own size; skips without data."""
    root = data_root()
    images: dict[str, list[np.ndarray]] = {}
    for name, pattern in IMAGE_SETS.items():
        paths = sorted(root.glob(pattern))[:3]
        if not paths:
            pytest.skip(f"no images match {pattern} under {root}: set SDRM_DATA to the data folder")
        images[name] = [read_gray(path) for path in paths]
    return images


@pytest.fixture(scope="session")
def token_images(full_images) -> dict[str, np.ndarray]:
    """The first image of each data set, resized to 224 x 224."""
    return {name: resize_gray(images[0]) for name, images in full_images.items()}


@pytest.fixture(scope="session")
def token_matrices(full_images, token_images) -> dict[str, torch.Tensor]:
    """Real token matrices of both shapes the project uses, keyed by '<image> <rows>x<columns>'.

    Per image: the 196 x 768 ViT-B tokens, a 196 x 64 head slice and a 64 x 16 slice (64 tokens
    of one 16-feature head). From the board photos, which are large frames: 1600 x 16 and
    5184 x 16 head slices of (b*t) x d_h with the tokens of 9 and 27 tiles of 224 x 224.
    """
    matrices: dict[str, torch.Tensor] = {}
    for name, image in token_images.items():
        tokens = embed_tokens(image)
        matrices[f"{name} 196x768"] = tokens
        matrices[f"{name} 196x64"] = head_slice(tokens, 2, 64)
        matrices[f"{name} 64x16"] = head_slice(tokens, 5, 16)[:64].contiguous()

    tiles = [tile for board in full_images["boards"] for tile in cut_tiles(board)]
    batch = torch.cat([embed_tokens(tile) for tile in tiles])
    matrices["boards 1600x16"] = head_slice(batch[:1600], 7, 16)
    matrices["boards 5184x16"] = head_slice(batch[:5184], 11, 16)
    return matrices


@pytest.fixture(scope="session")
def shifted_token_streams(token_images) -> dict[str, list[torch.Tensor]]:
    """Token matrices of four consecutive frames per image (shifts of 0 to 3 pixels).

    Keyed by '<image> 196x768' for the tokens and '<image> 196x16' for one head slice.
    """
    streams = {}
    for name, image in token_images.items():
        frames = [embed_tokens(shift_image(image, shift, (shift + 1) // 2)) for shift in range(4)]
        streams[f"{name} 196x768"] = frames
        streams[f"{name} 196x16"] = [head_slice(frame, 3, 16) for frame in frames]
    return streams
