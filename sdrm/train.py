"""Training with the rank reduction in the loop, early stopping and threshold choice on validation.

The test split is loaded only by `sdrm eval`; nothing here reads it.
"""

from __future__ import annotations

import math
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sdrm import __version__
from sdrm.baseline import PlainCNN
from sdrm.checkpoint import save_checkpoint
from sdrm.data import CLASSES, augment, class_weights, detect_dataset, load_images, load_samples
from sdrm.metrics import best_threshold, binary_metrics
from sdrm.model import ModelConfig, SDRMClassifier

DEFAULT_IMAGE_SIZE = {"deeppcb": 128, "elpv": 192}
# DeepPCB boards are cut into crop-size tiles like the training crops; an ELPV cell is one image.
FRAME_MODE = {"deeppcb": "tile", "elpv": "resize"}


@dataclass
class TrainConfig:
    """Training settings. group_size is the number of images factorised together (the SVD batch)."""

    arch: str = "sdrm"
    phi: float | None = 0.9
    image_size: int | None = None
    epochs: int = 45
    batch_size: int = 64
    group_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    patience: int = 25
    max_shift: int = 0
    max_minutes: float = 18.0
    seed: int = 0
    threads: int | None = None
    model: dict = field(default_factory=dict)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_model(config: TrainConfig, image_size: int) -> tuple[torch.nn.Module, dict]:
    """Return the model and its manifest "architecture" entry."""
    if config.arch == "cnn":
        model = PlainCNN(image_size=image_size)
        return model, {"kind": "cnn", "image_size": image_size}
    if config.arch != "sdrm":
        raise ValueError(f"unknown architecture {config.arch!r}; choose sdrm or cnn")
    model_config = ModelConfig(image_size=image_size, phi=config.phi, **config.model)
    return SDRMClassifier(model_config), {"kind": "sdrm", **model_config.to_dict()}


def forward(model: torch.nn.Module, images: torch.Tensor, group_size: int | None) -> torch.Tensor:
    if isinstance(model, SDRMClassifier):
        return model(images, group_size=group_size)
    return model(images)


@torch.no_grad()
def predict_scores(model: torch.nn.Module, images: torch.Tensor, mean: float, std: float, batch: int = 128) -> np.ndarray:
    """Return the defect probability of each uint8 image, each image factorised alone (one frame)."""
    model.eval()
    scores = []
    for start in range(0, images.shape[0], batch):
        chunk = (images[start : start + batch].float() / 255.0 - mean) / std
        logits = forward(model, chunk, group_size=1)
        scores.append(torch.softmax(logits, dim=-1)[:, 1])
    return torch.cat(scores).numpy()


def train(data_dir: Path, out_dir: Path, config: TrainConfig, progress: bool = True) -> dict:
    """Train on the train split of data_dir, stop early on validation, write a checkpoint to out_dir.

    Returns the manifest. The loss is cross-entropy with class weights w_c = N / (C * N_c).
    Validation picks the epoch (highest balanced accuracy, then lowest loss) and the decision
    threshold (highest balanced accuracy).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    generator = seed_everything(config.seed)
    dataset = detect_dataset(data_dir)
    image_size = config.image_size or DEFAULT_IMAGE_SIZE[dataset]

    samples = load_samples(data_dir, seed=config.seed)
    train_samples = [s for s in samples if s.split == "train"]
    val_samples = [s for s in samples if s.split == "val"]
    train_images, train_labels = load_images(train_samples, image_size)
    val_images, val_labels = load_images(val_samples, image_size)

    mean = float(train_images.float().mean() / 255.0)
    std = float(train_images.float().std() / 255.0) or 1.0
    weights = class_weights(train_labels)
    model, architecture = build_model(config, image_size)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_samples) / config.batch_size)
    schedule = _cosine_schedule(optimizer, config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch)

    best = {"balanced_accuracy": -1.0, "loss": math.inf, "epoch": -1, "state": None}
    history = []
    started = time.monotonic()
    bar = tqdm(range(config.epochs), desc=f"train {dataset} {config.arch}", disable=not progress, unit="epoch")

    for epoch in bar:
        model.train()
        order = torch.randperm(len(train_samples), generator=generator)
        epoch_loss = 0.0
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            usable = len(index) - len(index) % config.group_size
            if usable == 0:
                continue
            index = index[:usable]
            images = augment(train_images[index].float() / 255.0, generator, max_shift=config.max_shift)
            logits = forward(model, (images - mean) / std, config.group_size)
            loss = F.cross_entropy(logits, train_labels[index], weight=weights)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            epoch_loss += float(loss.detach()) * usable

        val_scores = predict_scores(model, val_images, mean, std)
        val_loss = _weighted_loss(val_scores, val_labels.numpy(), weights.numpy())
        val_metrics = binary_metrics(val_labels.numpy(), val_scores, 0.5)
        record = {
            "epoch": epoch + 1,
            "train_loss": epoch_loss / max(len(order), 1),
            "val_loss": val_loss,
            "val_balanced_accuracy": val_metrics["balanced_accuracy"],
            "val_auroc": val_metrics["auroc"],
        }
        history.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_bacc=f"{record['val_balanced_accuracy']:.3f}", val_auc=f"{record['val_auroc']:.3f}")

        improved = val_metrics["balanced_accuracy"] > best["balanced_accuracy"] or (
            val_metrics["balanced_accuracy"] == best["balanced_accuracy"] and val_loss < best["loss"]
        )
        if improved:
            best = {
                "balanced_accuracy": val_metrics["balanced_accuracy"],
                "loss": val_loss,
                "epoch": epoch + 1,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            }
        if epoch + 1 - best["epoch"] >= config.patience:
            break
        if (time.monotonic() - started) / 60 > config.max_minutes:
            break

    model.load_state_dict(best["state"])
    val_scores = predict_scores(model, val_images, mean, std)
    threshold = best_threshold(val_labels.numpy(), val_scores)
    val_metrics = binary_metrics(val_labels.numpy(), val_scores, threshold)

    manifest = {
        "version": __version__,
        "architecture": architecture,
        "phi": config.phi if config.arch == "sdrm" else None,
        "rank_method": architecture.get("rank_method"),
        "class_names": list(CLASSES),
        "threshold": threshold,
        "input_size": image_size,
        "frame_mode": FRAME_MODE[dataset],
        "tile_stride": image_size // 2,
        "normalization": {"mean": mean, "std": std},
        "dataset": dataset,
        "data_summary": {
            "root": str(data_dir),
            "train": _counts(train_labels),
            "val": _counts(val_labels),
            "split_rule": "sdrm.data." + ("_deeppcb" if dataset == "deeppcb" else "_elpv"),
        },
        "training": {
            "seed": config.seed,
            "epochs_run": len(history),
            "best_epoch": best["epoch"],
            "minutes": (time.monotonic() - started) / 60,
            "group_size": config.group_size,
            "max_shift": config.max_shift,
            "epochs": config.epochs,
            "patience": config.patience,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "class_weights": weights.tolist(),
            "torch": torch.__version__,
            "machine": platform.platform(),
            "threads": torch.get_num_threads(),
        },
        "metrics": {"val": val_metrics},
        "history": history,
    }
    save_checkpoint(model, manifest, out_dir)
    return manifest


def _counts(labels: torch.Tensor) -> dict:
    counts = torch.bincount(labels, minlength=len(CLASSES)).tolist()
    return {name: count for name, count in zip(CLASSES, counts)}


def _weighted_loss(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    probabilities = np.where(labels == 1, scores, 1.0 - scores).clip(1e-7, 1.0)
    sample_weights = weights[labels]
    return float(-(sample_weights * np.log(probabilities)).sum() / sample_weights.sum())


def _cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
