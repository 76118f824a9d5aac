"""Cost model of one frame: floating-point operations, bytes on the wire and an energy estimate.

Notation: b images per frame, t tokens per image, d features per token, h heads of d_h = d / h
features, m = b*t rows of a head slice Y_i (m x d_h), r its kept rank.

FLOP convention: one multiply-add is 2 FLOPs. `attention_flops` and `rest_flops` count the matrix
products that the model runs. They equal what torch.utils.flop_counter counts when attention runs
as plain matrix products (the math backend of scaled_dot_product_attention). Element-wise work
(scaling by S, softmax, biases, GELU, LayerNorm) is O(m d) or O(b t^2) and is not counted.
`rank_reduction_flops` adds leading-order counts for the dense factorisations (Householder QR,
symmetric eigendecomposition, thin SVD), which no counter measures, so its results are estimates.

Byte counts follow the binary wire format of `sdrm.wire`: per head a fixed record, then raw arrays.
The storage compression ratio CR = b t d / (b t r + r + r d) is `sdrm.lowrank.compression_ratio`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sdrm.lowrank import GRAM_MAX_SIDE, compression_ratio

__all__ = [
    "EXAMPLE_ALPHA_FLOP_J",
    "EXAMPLE_DELTA_ACCESS_J",
    "EXAMPLE_GAMMA_BIT_J",
    "HEAD_COUNT_BYTES",
    "HEAD_RECORD_BYTES",
    "RANK_REDUCTION_METHODS",
    "attention_flops",
    "block_bytes",
    "block_elements",
    "compression_ratio",
    "energy_estimate",
    "frame_bytes_per_device",
    "partial_bytes",
    "rank_reduction_flops",
    "raw_token_bytes",
    "rest_flops",
]

# Per-head record of a BLOCKS or PARTIALS payload: head u16, batch u32, tokens u32, head_dim u16,
# rank u16, dense u8, energy f32.
HEAD_RECORD_BYTES = 19
# Head count u16 at the start of a BLOCKS or PARTIALS payload.
HEAD_COUNT_BYTES = 2

RANK_REDUCTION_METHODS = ("exact", "gram", "randomized", "subspace", "adamatrix", "auto")
# Iterations assumed when `iterations` is None: power iterations of the randomized range finder,
# warm-started subspace steps (1 to 2 on similar frames) and AdaMatrix steps from a random start
# (about 50 on image tokens).
DEFAULT_ITERATIONS = {"randomized": 2, "subspace": 2, "adamatrix": 50}
# Extra sketch columns beyond the rank, as the `sdrm.lowrank` methods use them.
DEFAULT_OVERSAMPLE = {"randomized": 8, "subspace": 4, "adamatrix": 4}

# Example constants for `energy_estimate`. They are order-of-magnitude estimates, not measurements
# of any device: replace them with values measured on the target hardware.
EXAMPLE_ALPHA_FLOP_J = 1e-11  # J per FLOP, about 10 pJ, an embedded GPU of the Jetson class
EXAMPLE_GAMMA_BIT_J = 1e-9  # J per bit sent over wired Ethernet, NIC and switch together
EXAMPLE_DELTA_ACCESS_J = 1e-9  # J per word read from or written to off-chip DRAM


# FLOPs -------------------------------------------------------------------------------------------


def rank_reduction_flops(
    batch: int,
    tokens: int,
    features: int,
    heads: int,
    rank: int | Sequence[int],
    method: str = "auto",
    iterations: int | None = None,
    oversample: int | None = None,
    warm_start: bool = False,
) -> int:
    """Return the estimated FLOPs to factorise all h head slices of one frame.

    Each head slice is m x n with m = batch*tokens and n = features / heads. Let p = max(m, n),
    q = min(m, n), k = min(r + oversample, q) the sketch width, and T the iteration count. The
    estimates use three leading-order counts:
    - Householder QR of a p x k matrix with explicit thin Q: 4 p k^2.
    - symmetric eigendecomposition of a q x q matrix with eigenvectors: 9 q^3.
    - thin SVD of a p x q matrix with U, S and V: 6 p q^2 + 20 q^3.

    Per head:

    - exact: 6 p q^2 + 20 q^3 (thin SVD).
    - gram: 2 p q^2 (Gram matrix of the smaller side) + 9 q^3 (eigh) + 2 m n r (the other factor).
    - randomized: 2 m n k (2 + 2 T) (sketch, T power iterations, projection)
      + 4 m k^2 (1 + T) + 4 n k^2 T (QRs) + 6 n k^2 + 20 k^3 (SVD of the k x n projection)
      + 2 m k r (U). This is one pass at width k; `sdrm.lowrank` widens the sketch and repeats the
      pass when k columns hold less than phi of the energy.
    - subspace: T (6 m n k + 4 m k^2 + 6 n k^2 + 26 k^3) (two products, two QRs and a Rayleigh-Ritz
      step of k x k per iteration) + 2 (m + n) k r (U and V).
    - adamatrix: T (10 m n k + 4 (m + n) k^2) (five m x n by n x k products for the loss and the
      gradients, two QRs per step) + 4 (m + n) k^2 (the first QRs of U and V).
    - auto: gram when q <= 64 (GRAM_MAX_SIDE), else subspace with `warm_start` and randomized
      without, as `sdrm.lowrank.truncated_svd` chooses.

    rank: one rank r for every head, or one per head. iterations None takes 2 for randomized and
    subspace and 50 for adamatrix; oversample None takes 8 (randomized) or 4 (subspace,
    adamatrix). Raises ValueError for sizes < 1, features not divisible by heads, a rank outside
    1..q or an unknown method.
    """
    _check_positive(batch=batch, tokens=tokens, features=features, heads=heads)
    head_dim = _head_dim(features, heads)
    rows = batch * tokens
    ranks = _per_head_ranks(rank, heads, min(rows, head_dim))
    method = _resolve_method(method, rows, head_dim, warm_start)
    steps = DEFAULT_ITERATIONS.get(method, 0) if iterations is None else iterations
    extra = DEFAULT_OVERSAMPLE.get(method, 0) if oversample is None else oversample
    if steps < 0 or extra < 0:
        raise ValueError(f"iterations and oversample must be >= 0, got {iterations} and {oversample}")

    return sum(_head_rank_reduction_flops(rows, head_dim, head_rank, method, steps, extra) for head_rank in ranks)


def attention_flops(batch: int, tokens: int, head_dim: int, rank: int | None) -> int:
    """Return the FLOPs of one head's attention for one frame, from its factor block or dense slice.

    With m = b*t and r the rank:
    - QKV from factors (rank r): 2 r d_h (3 d_h) for V^T [W^Q W^K W^V] plus 2 m r (3 d_h) for
      (U S) times that, so 6 r d_h^2 + 6 m r d_h.
    - QKV dense (rank None, no rank reduction): 2 m d_h (3 d_h) = 6 m d_h^2.
    - scores Q K^T and the weighted sum of V per image: 2 b t^2 d_h each, so 4 b t^2 d_h.

    The factor form is cheaper than the dense one when 6 r d_h (d_h + m) < 6 m d_h^2, that is when
    r < m d_h / (m + d_h), which is close to d_h for m >> d_h. Raises ValueError for sizes < 1
    or a rank above d_h.
    """
    _check_positive(batch=batch, tokens=tokens, head_dim=head_dim)
    rows = batch * tokens
    scores = 4 * batch * tokens * tokens * head_dim
    if rank is None:
        return 6 * rows * head_dim * head_dim + scores
    _check_rank(rank, head_dim)
    return 6 * rank * head_dim * head_dim + 6 * rows * rank * head_dim + scores


def rest_flops(
    batch: int,
    tokens: int,
    features: int,
    heads: int,
    rank: int | Sequence[int] | None = None,
    mlp_ratio: float = 2.0,
    local_blocks: int = 1,
    num_classes: int = 2,
    pool: str = "meanmax",
) -> int:
    """Return the FLOPs of the aggregator part of `SDRMClassifier` for one frame.

    With m = b*t and hidden = int(d * mlp_ratio), as `sdrm.model.MLP` rounds it:
    - reduced tokens X_hat_i = (U S) V^T per head: 2 m r_i d_h (0 for dense blocks, rank None);
    - output projection: 2 m d^2;
    - MLP: 2 m d hidden twice, so 4 m d hidden;
    - each local encoder block: QKV 6 m d^2, attention 4 b t^2 d, output projection 2 m d^2, MLP
      4 m d hidden;
    - classifier on the pooled tokens: 2 b p d num_classes, with p = 2 for "meanmax" pooling
      (mean and max concatenated) and 1 for "mean".

    rank: one rank for every head, one per head, or None for dense blocks. Raises ValueError for
    invalid sizes or ranks.
    """
    _check_positive(batch=batch, tokens=tokens, features=features, heads=heads, num_classes=num_classes)
    if local_blocks < 0:
        raise ValueError(f"local_blocks must be >= 0, got {local_blocks}")
    if not (math.isfinite(mlp_ratio) and mlp_ratio > 0):
        raise ValueError(f"mlp_ratio must be a finite number > 0, got {mlp_ratio}")
    head_dim = _head_dim(features, heads)
    rows = batch * tokens
    hidden = int(features * mlp_ratio)

    reconstruct = 0
    if rank is not None:
        ranks = _per_head_ranks(rank, heads, head_dim)
        reconstruct = sum(2 * rows * head_rank * head_dim for head_rank in ranks)
    projection = 2 * rows * features * features
    mlp = 4 * rows * features * hidden
    local = (
        6 * rows * features * features
        + 4 * batch * tokens * tokens * features
        + 2 * rows * features * features
        + 4 * rows * features * hidden
    )
    if pool not in ("mean", "meanmax"):
        raise ValueError(f"pool must be 'mean' or 'meanmax', got {pool!r}")
    pooled = 2 if pool == "meanmax" else 1
    classifier = 2 * batch * pooled * features * num_classes
    return reconstruct + projection + mlp + local_blocks * local + classifier


# Bytes -------------------------------------------------------------------------------------------


def block_elements(batch: int, tokens: int, head_dim: int, rank: int, dense: bool = False) -> int:
    """Return the number of array elements in one head's factor block.

    A factor block holds U (m x r), S (r) and V (d_h x r): m r + r + d_h r elements with m = b*t.
    A dense block holds only Y_i (m x d_h), because the receiver rebuilds S = 1 and V = I, so
    `rank` is ignored.
    """
    _check_positive(batch=batch, tokens=tokens, head_dim=head_dim)
    rows = batch * tokens
    if dense:
        return rows * head_dim
    _check_rank(rank, head_dim, minimum=0)
    return rows * rank + rank + head_dim * rank


def block_bytes(
    batch: int, tokens: int, head_dim: int, rank: int, dtype_bytes: int = 2, dense: bool = False
) -> int:
    """Return the array bytes of one head's factor block: `block_elements` * dtype_bytes.

    dtype_bytes is 2 for float16 and 4 for float32. The per-head record (HEAD_RECORD_BYTES) and
    the message envelope are not included.
    """
    _check_dtype_bytes(dtype_bytes)
    return block_elements(batch, tokens, head_dim, rank, dense) * dtype_bytes


def partial_bytes(
    batch: int, tokens: int, head_dim: int, rank: int, dtype_bytes: int = 2, dense: bool = False
) -> int:
    """Return the array bytes of one head in a PARTIALS message: its factor block plus Z_i.

    A partial carries the head's factor block, from which the aggregator rebuilds the reduced tokens,
    and the attention output Z_i (b x t x d_h): block_bytes + b t d_h dtype_bytes. The per-head
    record and the envelope are not included.
    """
    output = batch * tokens * head_dim * dtype_bytes
    return block_bytes(batch, tokens, head_dim, rank, dtype_bytes, dense) + output


def frame_bytes_per_device(
    batch: int,
    tokens: int,
    head_dim: int,
    ranks: Sequence[int],
    dtype_bytes: int = 2,
    dense: bool = False,
    envelope_bytes: int = 0,
) -> int:
    """Return the bytes one device receives and sends per frame for the heads with `ranks`.

    The device receives one BLOCKS message and sends one PARTIALS message, each made of an
    envelope (`envelope_bytes`), HEAD_COUNT_BYTES and, per head, HEAD_RECORD_BYTES and the arrays.
    The envelope size depends on the ids and stage timings, and
    len(sdrm.wire.encode_blocks(env, [])) - 2 measures it for one envelope. The total is

        2 (envelope_bytes + HEAD_COUNT_BYTES)
        + sum over heads (2 HEAD_RECORD_BYTES + block_bytes + partial_bytes).

    A device with no heads exchanges nothing and gets 0. This is sent + received of Eq. 13 for one
    frame; multiply by the frame rate for bytes per second.
    """
    if envelope_bytes < 0:
        raise ValueError(f"envelope_bytes must be >= 0, got {envelope_bytes}")
    if not ranks:
        return 0
    per_heads = sum(
        2 * HEAD_RECORD_BYTES
        + block_bytes(batch, tokens, head_dim, rank, dtype_bytes, dense)
        + partial_bytes(batch, tokens, head_dim, rank, dtype_bytes, dense)
        for rank in ranks
    )
    return 2 * (envelope_bytes + HEAD_COUNT_BYTES) + per_heads


def raw_token_bytes(batch: int, tokens: int, features: int, dtype_bytes: int = 2) -> int:
    """Return the bytes of the dense tokens X (b x t x d): b t d dtype_bytes."""
    _check_positive(batch=batch, tokens=tokens, features=features)
    _check_dtype_bytes(dtype_bytes)
    return batch * tokens * features * dtype_bytes


# Energy ------------------------------------------------------------------------------------------


def energy_estimate(
    m: int,
    n: int,
    r: int,
    iterations: int,
    devices: int,
    block_side: int,
    alpha_flop_j: float = EXAMPLE_ALPHA_FLOP_J,
    gamma_bit_j: float = EXAMPLE_GAMMA_BIT_J,
    delta_access_j: float = EXAMPLE_DELTA_ACCESS_J,
    bits_per_word: int = 16,
) -> dict[str, float]:
    """Return the SDRM energy model's three terms and their sum, in joules.

    For an m x n token matrix (m = b*t, n = d) reduced to rank r in T = `iterations` steps and
    sent to M = `devices` devices as s x s blocks (s = `block_side`, in words), SDRM (Du et al.,
    Knowledge-Based Systems 325, 2025) models

        P_total = alpha_flop (2 m n r + T r^2 (m + n))
                + gamma_bit M s^2 bits_per_word
                + delta_access (m n - (m r + r n)).

    Keys and units:
    - compute_j: alpha_flop_j [J/FLOP] * (2 m n r + T r^2 (m + n)) [FLOP].
    - transfer_j: gamma_bit_j [J/bit] * M s^2 [words] * bits_per_word [bit/word]. The model
      counts s^2 words per block, so the word count is converted to bits here (16 for float16).
    - memory_j: delta_access_j [J/word] * (m n - (m r + r n)) [words].
    - total_j: the sum of the three.

    memory_j is the access energy of the words that the factors save over the dense tokens, and
    it is negative when r > m n / (m + n). It is added as the model writes it.

    The default constants are the EXAMPLE_* order-of-magnitude estimates. Raises ValueError for
    m, n, r < 1, r > min(m, n), negative counts or negative or non-finite constants.
    """
    _check_positive(m=m, n=n, r=r, bits_per_word=bits_per_word)
    if r > min(m, n):
        raise ValueError(f"rank r = {r} exceeds min(m, n) = {min(m, n)}: a rank is at most the smaller side")
    for name, count in (("iterations", iterations), ("devices", devices), ("block_side", block_side)):
        if count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    for name, constant in (
        ("alpha_flop_j", alpha_flop_j),
        ("gamma_bit_j", gamma_bit_j),
        ("delta_access_j", delta_access_j),
    ):
        if not (math.isfinite(constant) and constant >= 0):
            raise ValueError(f"{name} must be a finite energy >= 0 in joules, got {constant}")

    flops = 2 * m * n * r + iterations * r * r * (m + n)
    bits = devices * block_side * block_side * bits_per_word
    words_saved = m * n - (m * r + r * n)

    compute = alpha_flop_j * flops
    transfer = gamma_bit_j * bits
    memory = delta_access_j * words_saved
    return {"compute_j": compute, "transfer_j": transfer, "memory_j": memory, "total_j": compute + transfer + memory}


# Helpers -----------------------------------------------------------------------------------------


def _head_rank_reduction_flops(rows: int, cols: int, rank: int, method: str, steps: int, extra: int) -> int:
    longer, shorter = max(rows, cols), min(rows, cols)
    width = min(rank + extra, shorter)

    if method == "exact":
        return _svd_flops(longer, shorter)
    if method == "gram":
        return 2 * longer * shorter * shorter + 9 * shorter**3 + 2 * rows * cols * rank
    if method == "randomized":
        products = 2 * rows * cols * width * (2 + 2 * steps)
        factorisations = _qr_flops(rows, width) * (1 + steps) + _qr_flops(cols, width) * steps
        return products + factorisations + _svd_flops(cols, width) + 2 * rows * width * rank
    if method == "subspace":
        per_step = (
            6 * rows * cols * width + _qr_flops(rows, width) + _qr_flops(cols, width)
            + 2 * cols * width * width + 26 * width**3
        )
        return steps * per_step + 2 * (rows + cols) * width * rank
    # adamatrix: every step, and the random start, orthonormalise U (m x k) and V (n x k) by QR.
    qr_pair = _qr_flops(rows, width) + _qr_flops(cols, width)
    return steps * (10 * rows * cols * width + qr_pair) + qr_pair


def _qr_flops(rows: int, cols: int) -> int:
    """Householder QR with explicit thin Q of a rows x cols matrix, rows >= cols: 4 rows cols^2."""
    return 4 * rows * cols * cols


def _svd_flops(rows: int, cols: int) -> int:
    """Thin SVD with U, S and V of a rows x cols matrix: 6 p q^2 + 20 q^3 with p, q the longer and shorter side."""
    longer, shorter = max(rows, cols), min(rows, cols)
    return 6 * longer * shorter * shorter + 20 * shorter**3


def _resolve_method(method: str, rows: int, cols: int, warm_start: bool) -> str:
    if method not in RANK_REDUCTION_METHODS:
        raise ValueError(f"unknown rank-reduction method {method!r}; choose one of {', '.join(RANK_REDUCTION_METHODS)}")
    if method != "auto":
        return method
    if min(rows, cols) <= GRAM_MAX_SIDE:
        return "gram"
    return "subspace" if warm_start else "randomized"


def _per_head_ranks(rank: int | Sequence[int], heads: int, maximum: int) -> list[int]:
    ranks = [rank] * heads if isinstance(rank, int) else list(rank)
    if len(ranks) != heads:
        raise ValueError(f"got {len(ranks)} ranks for {heads} heads: pass one rank, or one per head")
    for head_rank in ranks:
        _check_rank(head_rank, maximum)
    return ranks


def _head_dim(features: int, heads: int) -> int:
    if features % heads != 0:
        raise ValueError(f"features {features} is not divisible by heads {heads}: d must be a multiple of h")
    return features // heads


def _check_rank(rank: int, maximum: int, minimum: int = 1) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not minimum <= rank <= maximum:
        raise ValueError(f"rank {rank!r} is invalid: it must be an integer in {minimum}..{maximum}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_dtype_bytes(dtype_bytes: int) -> None:
    if dtype_bytes not in (2, 4, 8):
        raise ValueError(f"dtype_bytes must be 2 (float16), 4 (float32) or 8 (float64), got {dtype_bytes!r}")
