"""Blocked attention against PyTorch's fused attention, and factor-form Q, K, V."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sdrm.attention import blocked_attention, factor_qkv, head_attention
from sdrm.factors import FactorBlock, dense_block, factorize_heads, split_heads

import pytest


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 70),
    block_size=st.integers(1, 90),
    head_dim=st.sampled_from([1, 4, 16]),
    batch=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_blocked_matches_sdpa(tokens, block_size, head_dim, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, 2, tokens, head_dim, generator=generator) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    result = blocked_attention(q, k, v, block_size)
    assert result.shape == expected.shape
    assert torch.allclose(result, expected, atol=1e-5, rtol=1e-5)


def test_blocked_large_scores_stay_finite():
    q = torch.full((1, 5, 4), 300.0)
    k = torch.full((1, 7, 4), 300.0)
    v = torch.randn(1, 7, 4)
    result = blocked_attention(q, k, v, 2)
    assert torch.isfinite(result).all()
    assert torch.allclose(result, F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_blocked_rejects_zero_block():
    q = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="block_size"):
        blocked_attention(q, q, q, 0)


def test_factor_qkv_equals_dense_projection():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 10, 8, generator=generator)
    weights = [torch.randn(8, 8, generator=generator) for _ in range(3)]
    blocks, _ = factorize_heads(tokens, 1, phi=1.0, method="exact")
    q, k, v = factor_qkv(blocks[0], *weights)
    assert torch.allclose(q, tokens @ weights[0], atol=1e-4)
    assert torch.allclose(k, tokens @ weights[1], atol=1e-4)
    assert torch.allclose(v, tokens @ weights[2], atol=1e-4)


def test_factor_qkv_uses_reduced_tokens():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(1, 32, 16, generator=generator)
    weights = [torch.randn(16, 16, generator=generator) for _ in range(3)]
    block = factorize_heads(tokens, 1, phi=0.6, method="exact")[0][0]
    assert block.rank < 16
    q, _, _ = factor_qkv(block, *weights)
    assert torch.allclose(q, block.reconstruct() @ weights[0], atol=1e-4)


def test_head_attention_block_sizes_agree():
    generator = torch.Generator().manual_seed(2)
    block = dense_block(0, torch.randn(3, 20, 8, generator=generator))
    weights = [torch.randn(8, 8, generator=generator) for _ in range(3)]
    fused = head_attention(block, *weights, block_size=None)
    for size in (1, 3, 16, 20, 64):
        assert torch.allclose(head_attention(block, *weights, block_size=size), fused, atol=1e-5)


def test_split_heads_rejects_indivisible():
    with pytest.raises(ValueError, match="multiple of the head count"):
        split_heads(torch.zeros(1, 4, 10), 3)


def test_split_heads_slices_features():
    tokens = torch.arange(24.0).reshape(1, 2, 12)
    heads = split_heads(tokens, 3)
    assert [h.shape for h in heads] == [torch.Size([1, 2, 4])] * 3
    assert torch.equal(torch.cat(heads, dim=-1), tokens)


def test_factor_block_validate_catches_nan():
    block = FactorBlock(0, torch.full((4, 1), float("nan")), torch.ones(1), torch.ones(2, 1), 1, 4)
    with pytest.raises(ValueError, match="NaN"):
        block.validate()


def test_factorize_heads_ranks_per_head():
    generator = torch.Generator().manual_seed(3)
    low = torch.randn(1, 50, 1, generator=generator) * torch.randn(1, 1, 8, generator=generator)
    high = torch.randn(1, 50, 8, generator=generator)
    blocks, _ = factorize_heads(torch.cat([low, high], dim=-1), 2, phi=0.9, method="exact")
    assert blocks[0].rank == 1
    assert blocks[1].rank > 1

