"""Model checkpoints: safetensors weights plus a JSON manifest; loading never unpickles."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdrm.baseline import PlainCNN
from sdrm.model import ModelConfig, SDRMClassifier

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def save_checkpoint(model: torch.nn.Module, manifest: dict, directory: Path) -> Path:
    """Write model.safetensors and manifest.json into directory; return the directory.

    The manifest must contain "architecture" (a ModelConfig dict for the SDRM classifier, or a
    dict with "kind" for other models), "class_names", "threshold", "input_size" and
    "normalization" ({"mean", "std"} of pixel values in [0, 1]).
    """
    for key in ("architecture", "class_names", "threshold", "input_size", "normalization"):
        if key not in manifest:
            raise ValueError(f"manifest is missing {key!r}")
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    manifest = {"manifest_version": MANIFEST_VERSION, **manifest}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory


def load_manifest(directory: Path) -> dict:
    """Read and check manifest.json of a checkpoint directory."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --model must be a directory written by `sdrm train`")
    manifest = json.loads(path.read_text())
    version = manifest.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest_version {version!r} is not supported (expected {MANIFEST_VERSION})")
    return manifest


def load_checkpoint(directory: Path, map_location: str = "cpu", require_sdrm: bool = True) -> tuple[torch.nn.Module, dict]:
    """Return the model (in eval mode) and its manifest from a checkpoint directory.

    With require_sdrm False a plain CNN baseline checkpoint loads too; the line's services need
    the SDRM classifier and raise ValueError for any other kind.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    architecture = manifest["architecture"]
    kind = architecture.get("kind", "sdrm")
    if kind == "cnn" and not require_sdrm:
        model: torch.nn.Module = PlainCNN(image_size=int(architecture["image_size"]))
    elif kind == "sdrm":
        model = SDRMClassifier(ModelConfig.from_dict({k: v for k, v in architecture.items() if k != "kind"}))
    else:
        raise ValueError(f"{directory} contains a {kind!r} model, not an SDRM classifier; the line needs a checkpoint from `sdrm train --arch sdrm`")
    try:
        state = load_file(str(directory / WEIGHTS), device=map_location)
    except SafetensorError as error:
        raise ValueError(f"{directory / WEIGHTS} is not a valid safetensors file ({error}): copy or retrain the checkpoint") from None
    model.load_state_dict(state)
    return model.eval(), manifest


def normalize(images: torch.Tensor, manifest: dict) -> torch.Tensor:
    """Map uint8 images (n, C, H, W) to the float input the model was trained on."""
    stats = manifest["normalization"]
    return (images.to(torch.float32) / 255.0 - stats["mean"]) / stats["std"]
