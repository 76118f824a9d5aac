"""The SDRM classifier's seams: compress, heads on serialised blocks, aggregate."""

import pytest
import torch

from sdrm.model import ModelConfig, SDRMClassifier
from sdrm.wire import Envelope, Kind, decode, encode_blocks, encode_partials


def _frame(seed: int, batch: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 128, 128, generator=generator)


def _split_over_wire(model: SDRMClassifier, images: torch.Tensor, dtype: str) -> torch.Tensor:
    envelope = Envelope(kind=Kind.BLOCKS, line="line1", camera="cam1", frame=1)
    blocks, _ = model.compress(images)

    received_blocks = []
    received_partials = []
    for block in blocks:
        sent = decode(encode_blocks(envelope, [block], dtype=dtype)).blocks[0]
        partial = model.head_forward(sent, block_size=16)
        back = decode(encode_partials(envelope, [sent], [partial], dtype=dtype))
        received_blocks += back.blocks
        received_partials += back.partials

    return model.aggregate(received_blocks, received_partials)


@pytest.mark.parametrize("phi", [0.9, 0.7, None])
def test_seams_match_whole_model(phi):
    torch.manual_seed(0)
    model = SDRMClassifier(ModelConfig(phi=phi)).eval()
    images = _frame(1)
    with torch.no_grad():
        whole = model(images)
    split = _split_over_wire(model, images, dtype="float32")
    assert torch.allclose(split, whole, atol=1e-4)


def test_seams_float16_close():
    torch.manual_seed(0)
    model = SDRMClassifier(ModelConfig(phi=0.9)).eval()
    images = _frame(2)
    with torch.no_grad():
        whole = torch.softmax(model(images), dim=-1)
    split = torch.softmax(_split_over_wire(model, images, dtype="float16"), dim=-1)
    assert torch.allclose(split, whole, atol=5e-3)


def test_forward_split_matches_forward():
    torch.manual_seed(0)
    model = SDRMClassifier(ModelConfig(phi=0.9)).eval()
    images = _frame(3, batch=9)
    with torch.no_grad():
        assert torch.allclose(model.forward_split(images, block_size=32), model(images), atol=1e-4)


def test_groups_factorise_separately():
    torch.manual_seed(0)
    model = SDRMClassifier(ModelConfig(phi=0.9)).eval()
    images = _frame(4, batch=4)
    with torch.no_grad():
        grouped = model(images, group_size=1)
        single = torch.cat([model(images[i : i + 1]) for i in range(4)])
    assert torch.allclose(grouped, single, atol=1e-4)


def test_training_gradient_flows_through_rank_reduction():
    torch.manual_seed(0)
    model = SDRMClassifier(ModelConfig(phi=0.8)).train()
    logits = model(_frame(5, batch=8), group_size=4)
    logits.sum().backward()
    assert model.stem.layers[0].weight.grad is not None
    assert torch.isfinite(model.stem.layers[0].weight.grad).all()
    assert model.w_q.grad.abs().sum() > 0


def test_aggregate_rejects_missing_head():
    model = SDRMClassifier(ModelConfig()).eval()
    blocks, _ = model.compress(_frame(6, batch=1))
    partials = [model.head_forward(block) for block in blocks]
    with pytest.raises(ValueError, match="heads"):
        model.aggregate(blocks[:-1], partials[:-1])


def test_config_rejects_bad_geometry():
    with pytest.raises(ValueError, match="divisible"):
        SDRMClassifier(ModelConfig(dim=96, heads=5))
    with pytest.raises(ValueError, match="multiple"):
        SDRMClassifier(ModelConfig(image_size=100))
