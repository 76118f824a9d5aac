"""Split rules, class weights, augmentation and the checkpoint manifest."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrm.checkpoint import load_checkpoint, load_manifest, save_checkpoint
from sdrm.data import augment, class_weights, default_data_root, load_samples
from sdrm.metrics import auroc, binary_metrics
from sdrm.model import ModelConfig, SDRMClassifier

DATA = default_data_root()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"dataset folder {DATA} not found (set SDRM_DATA)")


@needs_data
def test_deeppcb_no_board_in_two_splits():
    samples = load_samples(DATA / "deeppcb")
    boards = {}
    for sample in samples:
        boards.setdefault(sample.group, set()).add(sample.split)
    mixed = {board: splits for board, splits in boards.items() if len(splits) > 1}
    assert mixed == {}


@needs_data
def test_deeppcb_test_split_is_official():
    import csv

    rows = list(csv.DictReader((DATA / "deeppcb" / "labels.csv").open()))
    official_test = {row["file"] for row in rows if row["split"] == "test"}
    ours = {str(s.path.relative_to(DATA / "deeppcb")) for s in load_samples(DATA / "deeppcb") if s.split == "test"}
    assert ours == official_test
    assert len(ours) == 703


@needs_data
def test_deeppcb_source_images_disjoint():
    import csv

    rows = {row["file"]: row for row in csv.DictReader((DATA / "deeppcb" / "labels.csv").open())}
    sources = {}
    for sample in load_samples(DATA / "deeppcb"):
        source = rows[str(sample.path.relative_to(DATA / "deeppcb"))]["source_image"]
        sources.setdefault(source, set()).add(sample.split)
    assert all(len(splits) == 1 for splits in sources.values())


@needs_data
def test_elpv_blocks_contiguous_and_disjoint():
    samples = load_samples(DATA / "elpv")
    by_split = {}
    for sample in samples:
        number = int(sample.path.stem.replace("cell", ""))
        by_split.setdefault(sample.split, []).append(number)
    assert set(by_split) == {"train", "val", "test"}
    for split, numbers in by_split.items():
        blocks = {(n - 1) // 200 for n in numbers}
        for other, other_numbers in by_split.items():
            if other != split:
                assert blocks.isdisjoint({(n - 1) // 200 for n in other_numbers})
    assert 0.15 < len(by_split["test"]) / len(samples) < 0.3


@needs_data
def test_elpv_both_classes_in_every_split():
    samples = load_samples(DATA / "elpv")
    for split in ("train", "val", "test"):
        labels = {s.label for s in samples if s.split == split}
        assert labels == {0, 1}


def test_class_weights_formula():
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = class_weights(labels)
    assert weights[0].item() == pytest.approx(100 / (2 * 90))
    assert weights[1].item() == pytest.approx(100 / (2 * 10))
    # Weighted class totals are equal: N / C each.
    assert (weights[0] * 90).item() == pytest.approx((weights[1] * 10).item())


def test_class_weights_absent_class():
    weights = class_weights(torch.tensor([0, 0, 0]))
    assert weights[1].item() == 0.0
    assert weights[0].item() == pytest.approx(0.5)


def test_augment_keeps_range_and_shape():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 32, 32, generator=generator)
    out = augment(images, generator)
    assert out.shape == images.shape
    assert out.min() >= 0.0
    assert out.max() <= 1.0


def test_manifest_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    config = ModelConfig(phi=0.85)
    model = SDRMClassifier(config).eval()
    manifest = {
        "architecture": {"kind": "sdrm", **config.to_dict()},
        "class_names": ["ok", "defect"],
        "threshold": 0.42,
        "input_size": 128,
        "normalization": {"mean": 0.4, "std": 0.3},
        "phi": 0.85,
    }
    save_checkpoint(model, manifest, tmp_path)
    loaded, read = load_checkpoint(tmp_path)

    assert read["threshold"] == 0.42
    assert read["architecture"]["phi"] == 0.85
    assert loaded.config == config
    images = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert not list(tmp_path.glob("*.pt"))
    assert not list(tmp_path.glob("*.pkl"))


def test_manifest_version_checked(tmp_path: Path):
    (tmp_path / "manifest.json").write_text(json.dumps({"manifest_version": 99}))
    with pytest.raises(ValueError, match="manifest_version"):
        load_manifest(tmp_path)


def test_missing_checkpoint_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="sdrm train"):
        load_manifest(tmp_path / "nowhere")


def test_metrics_hand_case():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.6, 0.2, 0.7, 0.4])
    metrics = binary_metrics(labels, scores, 0.5)
    assert metrics["confusion"] == [[2, 1], [1, 1]]
    assert metrics["recall"] == pytest.approx(0.5)
    assert metrics["precision"] == pytest.approx(0.5)
    assert metrics["majority_accuracy"] == pytest.approx(0.6)
    assert auroc(labels, scores) == pytest.approx(5 / 6)
