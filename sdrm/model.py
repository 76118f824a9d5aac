"""The SDRM classifier: a small conv stem, one rank-reduced attention block, local blocks, a head.

    image (b, 1, H, W) -> conv stem -> + position [-> LayerNorm] -> X (b, t, d)
      -> per head i: factor block of Y_i (b*t, d_h) keeping phi of its energy      [compressor]
      -> per head i: Z_i = attention(Q_i, K_i, V_i) from the factors               [device]
      -> X_hat + concat(Z_i) W^O -> + MLP -> local encoder blocks -> mean and max pool
         -> logits (b, 2)                                                           [aggregator]

X_hat, the rank-reduced tokens U S V^T, is the residual stream, so the aggregator rebuilds it from
the factor blocks that come back with the partials and never needs X itself. With phi None (NRR
mode) the factor blocks are dense and the network is a plain ViT-style block.

The stem is a small stack of 3x3 convolutions (each stage one stride-2 conv and stem_depth - 1
stride-1 convs, then a last stride-2 conv to d features) instead of one 16x16 patch projection.
On PCB and EL images the defects are a few pixels wide, and convolutions keep such edges in the
tokens at little cost.

The b images of one frame (the tiles of a board, or one crop) are factorised together: the rank of
head i comes from the energy of all b*t tokens. Training groups `group_size` images the same way.
In training the gradient treats each kept right basis V_r as a constant: U S = Y V_r stays
differentiable in Y, so X_hat = Y V_r V_r^T is a projection whose gradient is V_r V_r^T. This
avoids the unstable derivative of an SVD at close singular values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdrm.attention import head_attention
from sdrm.factors import FactorBlock, factorize_heads
from sdrm.lowrank import LowRank


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and rank-reduction settings; stored in the checkpoint manifest.

    image_size: side of the square model input in pixels (tiles of larger frames have this size).
    dim: token features d; heads: h, so head_dim = dim / heads; phi: kept energy fraction, None for
    NRR; rank_method: a `sdrm.lowrank` method name used at inference; pool: "mean" or "meanmax"
    (mean and max over tokens, concatenated: a defect that covers a few tokens survives the max);
    token_norm: LayerNorm on X before factorisation. It is off by default, because a LayerNorm
    gives every token the same energy and phi then tends to drop a defect that covers one token.
    stem_depth: 3x3 convolutions per stem stage.
    """

    image_size: int = 128
    in_channels: int = 1
    stem_channels: tuple[int, ...] = (16, 32, 64)
    dim: int = 96
    heads: int = 6
    mlp_ratio: float = 2.0
    local_blocks: int = 1
    num_classes: int = 2
    phi: float | None = 0.9
    rank_method: str = "auto"
    min_rank: int = 1
    dropout: float = 0.0
    pool: str = "meanmax"
    token_norm: bool = False
    stem_depth: int = 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** (len(self.stem_channels) + 1)

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        values = dict(values)
        values["stem_channels"] = tuple(values.get("stem_channels", cls.stem_channels))
        return cls(**values)


class ConvStem(nn.Module):
    """Stride-2 3x3 conv, BatchNorm, GELU, repeated; a last stride-2 conv maps to d features."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = config.in_channels
        for width in config.stem_channels:
            layers += [nn.Conv2d(channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.GELU()]
            for _ in range(config.stem_depth - 1):
                layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.GELU()]
            channels = width
        layers.append(nn.Conv2d(channels, config.dim, 3, 2, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.layers(images)
        return features.flatten(2).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class LocalBlock(nn.Module):
    """A standard pre-norm encoder block that runs where the heads are joined (no rank reduction)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = nn.MultiheadAttention(config.dim, config.heads, dropout=config.dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = MLP(config.dim, config.mlp_ratio, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SDRMClassifier(nn.Module):
    """Defect classifier whose first attention block runs on per-head factor blocks."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.dim % config.heads != 0:
            raise ValueError(f"dim {config.dim} is not divisible by heads {config.heads}")
        if config.image_size % 2 ** (len(config.stem_channels) + 1) != 0:
            raise ValueError(
                f"image_size {config.image_size} must be a multiple of {2 ** (len(config.stem_channels) + 1)}"
            )
        self.config = config
        head_dim = config.head_dim

        self.stem = ConvStem(config)
        self.position = nn.Parameter(torch.zeros(1, config.tokens, config.dim))
        self.token_norm = nn.LayerNorm(config.dim) if config.token_norm else nn.Identity()

        # Per-head projections (h, d_h, d_h): head i reads only its own feature slice.
        bound = 1.0 / math.sqrt(head_dim)
        self.w_q = nn.Parameter(torch.empty(config.heads, head_dim, head_dim).uniform_(-bound, bound))
        self.w_k = nn.Parameter(torch.empty(config.heads, head_dim, head_dim).uniform_(-bound, bound))
        self.w_v = nn.Parameter(torch.empty(config.heads, head_dim, head_dim).uniform_(-bound, bound))
        self.out_proj = nn.Linear(config.dim, config.dim)
        self.norm_mlp = nn.LayerNorm(config.dim)
        self.mlp = MLP(config.dim, config.mlp_ratio, config.dropout)

        self.local_blocks = nn.ModuleList(LocalBlock(config) for _ in range(config.local_blocks))
        self.final_norm = nn.LayerNorm(config.dim)
        if config.pool not in ("mean", "meanmax"):
            raise ValueError(f"pool must be 'mean' or 'meanmax', got {config.pool!r}")
        pooled_features = config.dim * (2 if config.pool == "meanmax" else 1)
        self.classifier = nn.Linear(pooled_features, config.num_classes)
        nn.init.trunc_normal_(self.position, std=0.02)

    # (a) compressor part ---------------------------------------------------------------------------

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Return the patch tokens X (b, t, d) of normalised images (b, C, H, W)."""
        return self.token_norm(self.stem(images) + self.position)

    @torch.no_grad()
    def compress(
        self,
        images: torch.Tensor,
        phi: float | None = ...,  # type: ignore[assignment]
        method: str | None = None,
        warm_starts: list[LowRank | None] | None = None,
    ) -> tuple[list[FactorBlock], list[LowRank | None]]:
        """Embed one frame's images (b, C, H, W) and factorise each head's slice of X.

        Returns the h factor blocks (dense when phi is None) and the raw results for warm starts.
        phi and method default to the configured ones.
        """
        phi = self.config.phi if phi is ... else phi
        method = method or self.config.rank_method
        tokens = self.embed(images)
        return factorize_heads(
            tokens, self.config.heads, phi, method=method, warm_starts=warm_starts, min_rank=self.config.min_rank
        )

    # (b) head part ---------------------------------------------------------------------------------

    @torch.no_grad()
    def head_forward(self, block: FactorBlock, block_size: int | None = None) -> torch.Tensor:
        """Return head `block.head`'s attention output Z_i (b, t, d_h) from its factor block."""
        head = block.head
        return head_attention(block, self.w_q[head], self.w_k[head], self.w_v[head], block_size)

    # (c) aggregator part ---------------------------------------------------------------------------

    @torch.no_grad()
    def aggregate(self, blocks: list[FactorBlock], partials: list[torch.Tensor]) -> torch.Tensor:
        """Join all heads' factor blocks and partials (in head order) and return logits (b, classes)."""
        heads = [block.head for block in blocks]
        if heads != list(range(self.config.heads)) or len(partials) != len(blocks):
            raise ValueError(f"aggregate needs blocks and partials for heads 0..{self.config.heads - 1}, got {heads}")
        reduced = torch.cat([block.reconstruct() for block in blocks], dim=-1)
        attended = torch.cat(partials, dim=-1)
        return self._finish(reduced, attended)

    def _finish(self, reduced: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = reduced + self.out_proj(attended)
        x = x + self.mlp(self.norm_mlp(x))
        for block in self.local_blocks:
            x = block(x)
        x = self.final_norm(x)
        pooled = x.mean(dim=1)
        if self.config.pool == "meanmax":
            pooled = torch.cat([pooled, x.amax(dim=1)], dim=-1)
        return self.classifier(pooled)

    # Whole model -----------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, group_size: int | None = None, phi: float | None = ...) -> torch.Tensor:  # type: ignore[assignment]
        """Return logits (b, classes); images are factorised in consecutive groups of group_size.

        group_size None factorises all b images together, as one frame. This batched path uses the
        Gram eigendecomposition of each head slice (the `gram` method) and is differentiable in X.
        """
        phi = self.config.phi if phi is ... else phi
        tokens = self.embed(images)
        batch, count, dim = tokens.shape
        heads, head_dim = self.config.heads, self.config.head_dim
        group = batch if group_size is None else group_size
        if batch % group != 0:
            raise ValueError(f"batch {batch} is not a multiple of group_size {group}")

        # (groups, h, group*t, d_h): each row of the first axis is one frame's head slices.
        slices = tokens.reshape(batch // group, group * count, heads, head_dim).transpose(1, 2)
        if phi is None:
            reduced = slices
            left = slices
            basis = None
        else:
            basis = _kept_basis(slices.detach(), phi, self.config.min_rank)
            left = slices @ basis
            reduced = left @ basis.transpose(-2, -1)

        weights = torch.cat([self.w_q, self.w_k, self.w_v], dim=-1)
        if basis is None:
            projected = left @ weights.unsqueeze(0)
        else:
            projected = left @ (basis.transpose(-2, -1) @ weights.unsqueeze(0))
        q, k, v = projected.split(head_dim, dim=-1)

        def per_image(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch // group, heads, group, count, head_dim).transpose(1, 2).reshape(
                batch, heads, count, head_dim
            )

        attended = F.scaled_dot_product_attention(per_image(q), per_image(k), per_image(v))
        attended = attended.transpose(1, 2).reshape(batch, count, dim)
        reduced = per_image(reduced).transpose(1, 2).reshape(batch, count, dim)
        return self._finish(reduced, attended)

    @torch.no_grad()
    def forward_split(
        self, images: torch.Tensor, phi: float | None = ..., method: str | None = None, block_size: int | None = None  # type: ignore[assignment]
    ) -> torch.Tensor:
        """Run the three seams in sequence (compress, every head, aggregate) for one frame."""
        blocks, _ = self.compress(images, phi=phi, method=method)
        partials = [self.head_forward(block, block_size) for block in blocks]
        return self.aggregate(blocks, partials)


def _kept_basis(slices: torch.Tensor, phi: float, min_rank: int) -> torch.Tensor:
    """Return V_r for every slice (..., m, d_h), with the columns past each rank set to zero.

    V comes from the eigendecomposition of the Gram matrix Y^T Y (d_h x d_h). The zeroed columns
    make Y V V^T the projection onto each slice's own top-r right singular subspace.
    """
    gram = slices.transpose(-2, -1) @ slices
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.flip(-1).clamp_min(0.0)
    vectors = vectors.flip(-1)

    # The same rule as `select_rank`, vectorised: the smallest r whose cumulative energy reaches phi.
    cumulative = torch.cumsum(eigenvalues.to(torch.float64), dim=-1)
    target = phi * cumulative[..., -1:] * (1.0 - 1e-9)
    ranks = (cumulative < target).sum(dim=-1, keepdim=True) + 1
    ranks = ranks.clamp(min=min(min_rank, eigenvalues.shape[-1]), max=eigenvalues.shape[-1])
    columns = torch.arange(eigenvalues.shape[-1], device=slices.device)
    mask = (columns < ranks).to(vectors.dtype)
    return vectors * mask.unsqueeze(-2)
