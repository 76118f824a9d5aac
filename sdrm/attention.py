"""Attention computed from factor blocks, with keys and values taken in blocks.

For head i with factor block (U, S, V) of its token slice Y_i (b*t x d_h) and weights
W^Q, W^K, W^V (d_h x d_h):

    Q = (U S)(V^T W^Q),  K = (U S)(V^T W^K),  Vals = (U S)(V^T W^V)

which costs O(b t r d_h) instead of O(b t d_h^2) and never forms Y_i. Attention runs per image over
its t tokens: Z = softmax(Q K^T / sqrt(d_h)) Vals.
"""

from __future__ import annotations

import math

import torch

from sdrm.factors import FactorBlock


def factor_qkv(
    block: FactorBlock, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return Q, K, V of one head, each (b, t, d_h), from its factor block.

    Q = (U S)(V^T W^Q): the small r x d_h products V^T W are formed first, then one
    (b*t x r) @ (r x 3 d_h) product gives all three. A dense block (NRR) uses Y W directly.
    """
    weights = torch.cat([w_q, w_k, w_v], dim=1)
    left = block.left()

    if block.dense:
        projected = left @ weights
    else:
        projected = left @ (block.V.T @ weights)

    q, k, v = projected.reshape(block.batch, block.tokens, 3, -1).unbind(dim=2)
    return q, k, v


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """Return softmax(q k^T / sqrt(d_h)) v, taking keys and values in blocks of `block_size` tokens.

    q, k, v: (..., t, d_h); the result has q's shape. Each block j gives scores s_j, its row maximum
    m_j, l_j = sum exp(s_j - m_j) and o_j = exp(s_j - m_j) v_j. Blocks merge exactly (online
    softmax): with m' = max(m, m_j),

        l' = l e^(m - m') + l_j e^(m_j - m'),   o' = o e^(m - m') + o_j e^(m_j - m'),

    and the result is o / l. The SDRM paper instead adds the per-block softmax outputs, whose rows
    then no longer sum to one; this merge equals full softmax attention to rounding error for any t
    and any block size >= 1 (a block larger than t is one block). scale defaults to 1/sqrt(d_h).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    tokens = k.shape[-2]
    row_max = torch.full(q.shape[:-1] + (1,), -math.inf, dtype=q.dtype, device=q.device)
    row_sum = torch.zeros(q.shape[:-1] + (1,), dtype=q.dtype, device=q.device)
    output = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)

    for start in range(0, tokens, block_size):
        k_block = k[..., start : start + block_size, :]
        v_block = v[..., start : start + block_size, :]
        scores = (q @ k_block.transpose(-2, -1)) * scale

        block_max = scores.amax(dim=-1, keepdim=True)
        new_max = torch.maximum(row_max, block_max)
        weights = torch.exp(scores - new_max)
        correction = torch.exp(row_max - new_max)

        row_sum = row_sum * correction + weights.sum(dim=-1, keepdim=True)
        output = output * correction + weights @ v_block
        row_max = new_max

    return output / row_sum


def head_attention(
    block: FactorBlock,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    block_size: int | None = None,
) -> torch.Tensor:
    """Return one head's attention output Z_i (b, t, d_h) from its factor block.

    block_size None uses PyTorch's fused scaled_dot_product_attention, otherwise
    `blocked_attention`; both give the same result up to rounding.
    """
    q, k, v = factor_qkv(block, w_q, w_k, w_v)

    # Shaped (b, 1, t, d_h), PyTorch 2.13 runs its fused CPU kernel; 3-D inputs took a path about
    # 7x slower for 81 x 64 x 16 on 2 CPU cores.
    q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    if block_size is None or block_size >= block.tokens:
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    else:
        attended = blocked_attention(q, k, v, block_size)
    return attended.squeeze(1)
