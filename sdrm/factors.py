"""Heads and factor blocks: how patch tokens X are cut into per-head slices and factorised.

X has shape (b, t, d): b images (a frame, or the tiles of one large frame), t tokens per image and
d features per token. Head i owns the feature slice X_i = X[:, :, i*d_h:(i+1)*d_h] with
d_h = d / h, flattened to Y_i of shape (b*t, d_h). A factor block is the truncated SVD of Y_i,

    Y_i ~ U_i diag(S_i) V_i^T,   U_i: (b*t, r_i),  S_i: (r_i,),  V_i: (d_h, r_i),

with its own rank r_i chosen from the energy fraction phi. A dense block (no rank reduction, NRR)
carries Y_i itself in U with S = 1 and V = I, so the same equations hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdrm.lowrank import LowRank, truncated_svd


@dataclass(frozen=True)
class FactorBlock:
    """One head's factors of its token slice Y_i = X_i reshaped to (batch*tokens, head_dim).

    `dense` blocks carry Y_i in `U` with S = ones and V = identity (rank = head_dim).
    `energy` is the fraction of ||Y_i||_F^2 that the block keeps (1.0 for dense blocks).
    """

    head: int
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    batch: int
    tokens: int
    energy: float = 1.0
    dense: bool = False

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.V.shape[0])

    def left(self) -> torch.Tensor:
        """Return U diag(S), shape (batch*tokens, rank)."""
        if self.dense:
            return self.U
        return self.U * self.S

    def reconstruct(self) -> torch.Tensor:
        """Return the rank-r slice U diag(S) V^T reshaped to (batch, tokens, head_dim)."""
        if self.dense:
            flat = self.U
        else:
            flat = self.left() @ self.V.T
        return flat.reshape(self.batch, self.tokens, self.head_dim)

    def validate(self) -> None:
        """Raise ValueError when shapes or values are inconsistent."""
        rows = self.batch * self.tokens
        if self.U.ndim != 2 or self.U.shape[0] != rows:
            raise ValueError(
                f"head {self.head}: U has shape {tuple(self.U.shape)}, expected ({rows}, rank) "
                f"for batch {self.batch} x tokens {self.tokens}"
            )
        if self.S.ndim != 1 or self.U.shape[1] != self.S.shape[0]:
            raise ValueError(f"head {self.head}: S has shape {tuple(self.S.shape)}, expected ({self.U.shape[1]},)")
        if self.V.ndim != 2 or self.V.shape[1] != self.S.shape[0]:
            raise ValueError(
                f"head {self.head}: V has shape {tuple(self.V.shape)}, expected (head_dim, {self.S.shape[0]})"
            )
        for name, tensor in (("U", self.U), ("S", self.S), ("V", self.V)):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"head {self.head}: {name} contains NaN or Inf")


def split_heads(tokens: torch.Tensor, num_heads: int) -> list[torch.Tensor]:
    """Split tokens (b, t, d) into num_heads slices (b, t, d/num_heads), feature-wise.

    Raises ValueError when d is not divisible by num_heads.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (batch, tokens, features), got {tuple(tokens.shape)}")
    features = tokens.shape[-1]
    if num_heads < 1 or features % num_heads != 0:
        raise ValueError(
            f"cannot split {features} features into {num_heads} heads: the feature count must be "
            f"a multiple of the head count (try num_heads in {_divisors(features)})"
        )
    return list(tokens.split(features // num_heads, dim=-1))


def dense_block(head: int, slice_: torch.Tensor) -> FactorBlock:
    """Wrap a head slice (b, t, d_h) as a dense block: U = Y_i, S = 1, V = I (no rank reduction)."""
    batch, tokens, head_dim = slice_.shape
    flat = slice_.reshape(batch * tokens, head_dim)
    ones = torch.ones(head_dim, dtype=slice_.dtype, device=slice_.device)
    eye = torch.eye(head_dim, dtype=slice_.dtype, device=slice_.device)
    return FactorBlock(head=head, U=flat, S=ones, V=eye, batch=batch, tokens=tokens, energy=1.0, dense=True)


def factorize_heads(
    tokens: torch.Tensor,
    num_heads: int,
    phi: float | None,
    method: str = "auto",
    warm_starts: list[LowRank | None] | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> tuple[list[FactorBlock], list[LowRank | None]]:
    """Factorise every head slice of tokens (b, t, d); phi None gives dense blocks (NRR).

    Returns the blocks in head order and the raw low-rank results (None for dense blocks), which
    the caller can pass back as `warm_starts` for the next, similar frame.
    """
    batch, count, _ = tokens.shape
    slices = split_heads(tokens, num_heads)
    blocks: list[FactorBlock] = []
    results: list[LowRank | None] = []

    for head, slice_ in enumerate(slices):
        if phi is None:
            blocks.append(dense_block(head, slice_))
            results.append(None)
            continue

        warm = warm_starts[head] if warm_starts is not None and head < len(warm_starts) else None
        flat = slice_.reshape(batch * count, slice_.shape[-1])
        result = truncated_svd(flat, phi, method=method, warm_start=warm, min_rank=min_rank, max_rank=max_rank)
        blocks.append(
            FactorBlock(head=head, U=result.U, S=result.S, V=result.V, batch=batch, tokens=count, energy=result.energy)
        )
        results.append(result)

    return blocks, results


def _divisors(value: int) -> list[int]:
    return [n for n in range(1, value + 1) if value % n == 0]
