"""Inputs of `sdrm bench`: image streams, token matrices of both geometries, and the model.

Two token geometries are measured:

- ViT-B style: each image is resized to 224 x 224 and cut into 196 patches of 16 x 16 pixels.
  Every patch (256 pixels in [0, 1]) is projected to 768 features by a fixed seeded random matrix
  scaled by 1/16. Each token is then centred and divided by its standard deviation, a layer norm
  without weights, because raw pixel tokens are dominated by their mean and have rank 1.
- The model's own tokens: `SDRMClassifier.embed` on the tiles that `frame_to_tiles` cuts from the
  image, one head's feature slice at a time, (b*t) x d_h.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from sdrm.checkpoint import load_checkpoint
from sdrm.data import default_data_root
from sdrm.inference import frame_to_tiles
from sdrm.model import ModelConfig, SDRMClassifier

REPOSITORY = Path(__file__).resolve().parent.parent
SAMPLE_BOARDS = REPOSITORY / "samples" / "boards"
VIT_SIDE = 224
VIT_PATCH = 16
VIT_DIM = 768
VIT_HEADS = 12
VIT_SEED = 1234
RANDOM_MODEL_SEED = 0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# Manifest values for the random-init fallback model: the tiling of the shipped DeepPCB model
# (128 px tiles at stride 64, 81 tiles per 640 x 640 board) and a mid-grey normalisation.
FALLBACK_MANIFEST = {
    "architecture": ModelConfig().to_dict(),
    "class_names": ["ok", "defect"],
    "threshold": 0.5,
    "input_size": 128,
    "tile_stride": 64,
    "normalization": {"mean": 0.5, "std": 0.5},
}


@dataclass
class ImageSet:
    """An ordered stream of grayscale images from one data set folder."""

    name: str
    root: Path
    paths: list[Path]
    note: str = ""


@dataclass
class LoadedModel:
    """The model under test with its manifest and a `description` of where it came from."""

    model: SDRMClassifier
    manifest: dict
    description: str
    directory: Path | None
    shipped: bool


def board_images(limit: int | None = None) -> ImageSet | None:
    """Return the DeepPCB whole boards (the shared data folder, else samples/boards) in annotation order."""
    shared = default_data_root() / "deeppcb-boards"
    for root, note in ((shared, ""), (SAMPLE_BOARDS, f"{shared} not found, using the samples in the repository")):
        paths = _annotated_paths(root) if root.is_dir() else []
        if paths:
            return ImageSet("boards", root, paths[:limit] if limit else paths, note)
    return None


def elpv_images(limit: int | None = None) -> ImageSet | None:
    """Return the ELPV solar-cell images sorted by file name (neighbouring cells share a module)."""
    root = default_data_root() / "elpv"
    if not root.is_dir():
        return None
    paths = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
    if not paths:
        return None
    return ImageSet("elpv", root, paths[:limit] if limit else paths)


def _annotated_paths(root: Path) -> list[Path]:
    annotations = root / "annotations.json"
    if annotations.is_file():
        entries = json.loads(annotations.read_text())
        paths = [root / entry["file"] for entry in entries]
        return [path for path in paths if path.is_file()]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def read_gray(path: Path) -> np.ndarray:
    """Read an image file as a uint8 grayscale array; raises FileNotFoundError when unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}: the file is missing or not an image")
    return image


_VIT_PROJECTION: torch.Tensor | None = None


def vit_tokens(gray: np.ndarray) -> torch.Tensor:
    """Return the 196 x 768 ViT-B style tokens (float32) of a grayscale image of any size."""
    global _VIT_PROJECTION
    if _VIT_PROJECTION is None:
        generator = torch.Generator().manual_seed(VIT_SEED)
        _VIT_PROJECTION = torch.randn(VIT_PATCH * VIT_PATCH, VIT_DIM, generator=generator) / 16.0

    image = cv2.resize(gray, (VIT_SIDE, VIT_SIDE), interpolation=cv2.INTER_AREA)
    pixels = torch.as_tensor(image, dtype=torch.float32) / 255.0
    side = VIT_SIDE // VIT_PATCH
    patches = pixels.reshape(side, VIT_PATCH, side, VIT_PATCH).permute(0, 2, 1, 3).reshape(side * side, -1)
    tokens = patches @ _VIT_PROJECTION
    tokens = tokens - tokens.mean(dim=1, keepdim=True)
    return tokens / (tokens.std(dim=1, keepdim=True) + 1e-6)


def load_model(model_dir: Path | None) -> LoadedModel:
    """Load the checkpoint in model_dir (default: the shipped one), else a seeded random-init model.

    The fallback has the default ModelConfig, seed RANDOM_MODEL_SEED and FALLBACK_MANIFEST. Its
    timings and byte counts are those of the shipped architecture, but its ranks come from untrained
    tokens and differ from a trained model's.
    """
    from sdrm.cli import default_model_dir

    directory = Path(model_dir) if model_dir is not None else default_model_dir()
    if (directory / "manifest.json").is_file():
        model, manifest = load_checkpoint(directory)
        return LoadedModel(model, manifest, f"checkpoint {directory}", directory, shipped=True)
    if model_dir is not None:
        raise FileNotFoundError(f"{directory}/manifest.json not found: --model must be a directory written by `sdrm train`")

    torch.manual_seed(RANDOM_MODEL_SEED)
    model = SDRMClassifier(ModelConfig()).eval()
    description = (
        f"random-init SDRMClassifier (default ModelConfig, seed {RANDOM_MODEL_SEED}): "
        f"{directory} not found, so ranks and accuracy are not those of a trained model"
    )
    return LoadedModel(model, dict(FALLBACK_MANIFEST), description, None, shipped=False)


@torch.no_grad()
def model_tokens(loaded: LoadedModel, gray: np.ndarray) -> torch.Tensor:
    """Return the model's tokens X (b, t, d) of all tiles of one frame."""
    tiles, _ = frame_to_tiles(gray, loaded.manifest)
    return loaded.model.embed(tiles)


def head_slices(tokens: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """Return every head's slice of tokens (b, t, d) flattened to (b*t, d_h), contiguous."""
    batch, count, features = tokens.shape
    head_dim = features // heads
    return [
        tokens[:, :, head * head_dim : (head + 1) * head_dim].reshape(batch * count, head_dim).contiguous()
        for head in range(heads)
    ]
