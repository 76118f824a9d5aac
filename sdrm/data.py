"""Datasets on disk, their split rules, image loading and augmentation.

Split rules (kept here so that no note is needed to reproduce them):
- DeepPCB crops: the `split` column of labels.csv, which is the dataset's official split by source
  board image. `trainval` rows train, `test` rows test. Validation is carved from `trainval` by
  source image, never by crop, because a defect crop and its template crop show the same circuit.
- ELPV cells: no official split and no module id, but the file order follows the source modules.
  Files are cut into contiguous blocks of `ELPV_BLOCK` file numbers (cell0001..cell0200 is block 0);
  blocks with index % 5 == 2 are test and blocks with index % 5 == 4 validation, the rest train.
  Only the cells at a block's edge can share a module with the neighbouring block.
"""

from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

CLASSES = ("ok", "defect")
ELPV_BLOCK = 200


@dataclass(frozen=True)
class Sample:
    """One labelled image: label 0 = ok, 1 = defect; group = the source whose images stay together."""

    path: Path
    label: int
    split: str
    group: str


def default_data_root() -> Path:
    """Return $SDRM_DATA, or ../shared/data beside the repository."""
    configured = os.environ.get("SDRM_DATA")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def detect_dataset(root: Path) -> str:
    """Return "deeppcb" or "elpv" from the folder's name and labels.csv columns."""
    labels = root / "labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"{labels} not found: --data must be a dataset folder with labels.csv")
    with labels.open(newline="") as handle:
        header = next(csv.reader(handle))
    if "split" in header and "source_image" in header:
        return "deeppcb"
    if "cell_type" in header:
        return "elpv"
    raise ValueError(f"{labels}: unknown columns {header}; expected the DeepPCB or ELPV labels.csv")


def load_samples(root: Path, validation_fraction: float = 0.15, seed: int = 0) -> list[Sample]:
    """Return every sample of the dataset at root with its split: train, val or test."""
    dataset = detect_dataset(root)
    if dataset == "deeppcb":
        return _deeppcb(root, validation_fraction, seed)
    return _elpv(root)


def _deeppcb(root: Path, validation_fraction: float, seed: int) -> list[Sample]:
    rows = list(csv.DictReader((root / "labels.csv").open(newline="")))
    sources = sorted({row["source_image"] for row in rows if row["split"] == "trainval"})
    board_ids = sorted({_board_id(source) for source in sources})
    random.Random(seed).shuffle(board_ids)
    validation_boards = set(board_ids[: round(validation_fraction * len(board_ids))])

    samples = []
    for row in rows:
        board = _board_id(row["source_image"])
        if row["split"] == "test":
            split = "test"
        else:
            split = "val" if board in validation_boards else "train"
        samples.append(Sample(root / row["file"], CLASSES.index(row["label"]), split, board))
    return samples


def _board_id(source_image: str) -> str:
    """Return the board number of a DeepPCB source image: 00041001_test.jpg and _temp.jpg -> 00041001."""
    return source_image.split("_")[0]


def _elpv(root: Path) -> list[Sample]:
    samples = []
    for row in csv.DictReader((root / "labels.csv").open(newline="")):
        number = int(re.search(r"(\d+)", Path(row["file"]).stem).group(1))
        block = (number - 1) // ELPV_BLOCK
        if block % 5 == 2:
            split = "test"
        elif block % 5 == 4:
            split = "val"
        else:
            split = "train"
        samples.append(Sample(root / row["file"], CLASSES.index(row["label"]), split, f"block{block}"))
    return samples


def read_gray(path: Path, size: int | None = None) -> np.ndarray:
    """Read an image as uint8 grayscale (H, W), resized to size x size when given."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"cannot read image {path}: the file is missing or not an image")
    if size is not None and image.shape != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image


def load_images(samples: list[Sample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return uint8 images (n, 1, size, size) and labels (n,) for the samples."""
    images = np.stack([read_gray(sample.path, size) for sample in samples])
    labels = np.array([sample.label for sample in samples], dtype=np.int64)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


def class_weights(labels: torch.Tensor, classes: int = 2) -> torch.Tensor:
    """Return w_c = N / (C * N_c) for each class c; a class that is absent gets weight 0."""
    counts = torch.bincount(labels, minlength=classes).to(torch.float32)
    total = float(labels.numel())
    weights = torch.where(counts > 0, total / (classes * counts.clamp_min(1)), torch.zeros_like(counts))
    return weights


def augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 0) -> torch.Tensor:
    """Shift, flip, turn by multiples of 90 degrees and change brightness and contrast slightly.

    images: float (n, C, H, W) in [0, 1]. The changes suit inspection images, whose defects have no
    preferred orientation or position: each image moves by up to max_shift pixels per axis (edges
    mirrored), contrast varies by +-10 % and brightness by +-0.05.
    """
    count = images.shape[0]
    if max_shift > 0:
        height, width = images.shape[-2:]
        padded = torch.nn.functional.pad(images, (max_shift,) * 4, mode="reflect")
        offsets = torch.randint(0, 2 * max_shift + 1, (count, 2), generator=generator)
        images = torch.stack(
            [padded[i, :, int(dy) : int(dy) + height, int(dx) : int(dx) + width] for i, (dy, dx) in enumerate(offsets)]
        )
    flips = torch.rand(count, generator=generator) < 0.5
    images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    turns = torch.randint(0, 4, (count,), generator=generator)
    images = torch.stack([torch.rot90(image, int(k), dims=(-2, -1)) for image, k in zip(images, turns)])
    contrast = 1.0 + (torch.rand(count, 1, 1, 1, generator=generator) - 0.5) * 0.2
    brightness = (torch.rand(count, 1, 1, 1, generator=generator) - 0.5) * 0.1
    mean = images.mean(dim=(-2, -1), keepdim=True)
    return ((images - mean) * contrast + mean + brightness).clamp(0.0, 1.0)
