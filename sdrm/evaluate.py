"""Evaluation on the test split of a dataset, and on whole boards as a camera captures them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sdrm.checkpoint import load_checkpoint
from sdrm.data import load_images, load_samples, read_gray
from sdrm.inference import predict_frame
from sdrm.metrics import binary_metrics
from sdrm.train import predict_scores


def evaluate_split(model_dir: Path, data_dir: Path, split: str = "test", phi: float | None = ...) -> dict:  # type: ignore[assignment]
    """Return the metrics of the model on one split, every image factorised alone (one frame each)."""
    model, manifest = load_checkpoint(model_dir, require_sdrm=False)
    if phi is not ... and hasattr(model, "config"):
        model.config = type(model.config)(**{**model.config.to_dict(), "phi": phi})
    samples = [s for s in load_samples(data_dir) if s.split == split]
    if not samples:
        raise ValueError(f"{data_dir} has no samples in split {split!r}")
    images, labels = load_images(samples, int(manifest["input_size"]))
    stats = manifest["normalization"]
    scores = predict_scores(model, images, stats["mean"], stats["std"])
    metrics = binary_metrics(labels.numpy(), scores, float(manifest["threshold"]))
    metrics["split"] = split
    metrics["phi"] = model.config.phi if hasattr(model, "config") else None
    metrics["architecture"] = manifest["architecture"].get("kind", "sdrm")
    return metrics


def evaluate_boards(model_dir: Path, boards_dir: Path, progress: bool = True) -> dict:
    """Run the model on whole boards (annotations.json) and score boards and defect boxes.

    A board is a defect when any tile is flagged. A defect box counts as found when its centre lies
    in a flagged tile. Returns board accuracy, box coverage and each board's flagged tiles.
    """
    model, manifest = load_checkpoint(model_dir)
    annotations = json.loads((boards_dir / "annotations.json").read_text())
    results = []
    boxes_total = 0
    boxes_found = 0

    for entry in tqdm(annotations, desc="boards", disable=not progress, unit="board"):
        gray = read_gray(boards_dir / entry["file"])
        prediction = predict_frame(model, manifest, gray)
        found = 0
        for box in entry["boxes"]:
            cx, cy = (box["x1"] + box["x2"]) / 2, (box["y1"] + box["y2"]) / 2
            if any(t.x <= cx < t.x + t.w and t.y <= cy < t.y + t.h for t in prediction.flagged):
                found += 1
        boxes_total += len(entry["boxes"])
        boxes_found += found
        results.append(
            {
                "file": entry["file"],
                "label": entry["label"],
                "predicted": prediction.label,
                "score": prediction.score,
                "boxes": len(entry["boxes"]),
                "boxes_in_flagged_tile": found,
                "flagged_tiles": [[t.x, t.y, t.w, t.h, round(t.score, 4)] for t in prediction.flagged],
            }
        )

    labels = np.array([1 if r["label"] == "defect" else 0 for r in results])
    scores = np.array([r["score"] for r in results])
    threshold = float(manifest.get("frame_threshold", manifest["threshold"]))
    metrics = binary_metrics(labels, scores, threshold)
    return {
        "boards": len(results),
        "board_metrics": metrics,
        "boxes": boxes_total,
        "boxes_in_flagged_tile": boxes_found,
        "box_coverage": boxes_found / boxes_total if boxes_total else 0.0,
        "tile_stride": manifest.get("tile_stride"),
        "results": results,
    }


@torch.no_grad()
def tile_scores(model_dir: Path, boards_dir: Path) -> list[np.ndarray]:
    """Return every board's tile probabilities (for threshold studies)."""
    model, manifest = load_checkpoint(model_dir)
    annotations = json.loads((boards_dir / "annotations.json").read_text())
    return [np.array([t.score for t in predict_frame(model, manifest, read_gray(boards_dir / e["file"])).tiles]) for e in annotations]
