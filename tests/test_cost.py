"""Cost model: hand-computed FLOPs and bytes, agreement with the real model and wire format, energy."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sdrm import cost, lowrank
from sdrm.factors import FactorBlock, dense_block
from sdrm.model import ModelConfig, SDRMClassifier

# Small model: 64 x 64 images give a 4 x 4 token grid (t = 16), d = 96, h = 6, d_h = 16.
SMALL = ModelConfig(image_size=64, dim=96, heads=6, mlp_ratio=2.0, local_blocks=1, phi=0.9)


def counted_flops(function, *args, **kwargs) -> int:
    """Return the matrix-product FLOPs that torch's counter records, with attention in plain matmuls.

    The counter of torch 2.13 registers neither the CPU flash-attention kernel nor the fused
    inference path of nn.MultiheadAttention, so both are switched off while counting.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            function(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


def make_block(head: int, batch: int, tokens: int, head_dim: int, rank: int) -> FactorBlock:
    generator = torch.Generator().manual_seed(head)
    return FactorBlock(
        head=head,
        U=torch.randn(batch * tokens, rank, generator=generator),
        S=torch.rand(rank, generator=generator) + 0.5,
        V=torch.randn(head_dim, rank, generator=generator),
        batch=batch,
        tokens=tokens,
        energy=0.9,
    )


@pytest.fixture(scope="module")
def small_model() -> SDRMClassifier:
    torch.manual_seed(0)
    return SDRMClassifier(SMALL).eval()


# Bytes -------------------------------------------------------------------------------------------


def test_block_bytes_hand_computed():
    # m = 2*5 = 10 rows, d_h = 8, r = 3: U 30 + S 3 + V 24 = 57 values.
    assert cost.block_elements(2, 5, 8, 3) == 57
    assert cost.block_bytes(2, 5, 8, 3) == 114
    assert cost.block_bytes(2, 5, 8, 3, dtype_bytes=4) == 228
    assert cost.block_bytes(2, 5, 8, 3, dense=True) == 160  # Y_i only: 10 x 8 values


def test_partial_bytes_adds_output():
    # Z_i has 2*5*8 = 80 values.
    assert cost.partial_bytes(2, 5, 8, 3) == 114 + 160
    assert cost.partial_bytes(2, 5, 8, 3, dense=True) == 160 + 160


def test_raw_token_bytes_hand_computed():
    assert cost.raw_token_bytes(2, 196, 768) == 2 * 196 * 768 * 2
    assert cost.raw_token_bytes(1, 196, 768, dtype_bytes=4) == 196 * 768 * 4


def test_frame_bytes_per_device_hand_computed():
    ranks = [3, 2]
    per_head = [2 * 19 + cost.block_bytes(2, 5, 8, r) + cost.partial_bytes(2, 5, 8, r) for r in ranks]

    assert cost.frame_bytes_per_device(2, 5, 8, ranks) == 2 * 2 + sum(per_head)
    assert cost.frame_bytes_per_device(2, 5, 8, ranks, envelope_bytes=70) == 2 * (70 + 2) + sum(per_head)
    assert cost.frame_bytes_per_device(2, 5, 8, []) == 0


def test_compression_ratio_reused_from_lowrank():
    assert cost.compression_ratio is lowrank.compression_ratio
    # One head spanning all d features: dense bytes over factor bytes is CR.
    ratio = cost.raw_token_bytes(2, 196, 768) / cost.block_bytes(2, 196, 768, 12)
    assert ratio == pytest.approx(lowrank.compression_ratio(2, 196, 768, 12))


@pytest.fixture
def wire():
    """The wire format module; the tests that compare sizes with it skip when it is missing."""
    module = pytest.importorskip("sdrm.wire")
    if not hasattr(module, "encode_blocks"):
        pytest.skip("sdrm.wire has no encode_blocks")
    return module


def envelope(wire):
    return wire.Envelope(kind=wire.Kind.BLOCKS, line="line-1", camera="cam-7", device="jetson-2", epoch=3)


def header_bytes(wire, env) -> int:
    """Envelope bytes before the payload: an empty BLOCKS payload is only its u16 head count."""
    return len(wire.encode_blocks(env, [])) - cost.HEAD_COUNT_BYTES


@pytest.mark.parametrize("dtype, dtype_bytes", [("float16", 2), ("float32", 4)])
def test_block_bytes_match_wire_size(wire, dtype, dtype_bytes):
    blocks = [make_block(0, 2, 5, 8, 3), make_block(1, 2, 5, 8, 1), dense_block(2, torch.randn(2, 5, 8))]
    env = envelope(wire)

    size = len(wire.encode_blocks(env, blocks, dtype=dtype))

    arrays = sum(
        cost.block_bytes(b.batch, b.tokens, b.head_dim, b.rank, dtype_bytes, dense=b.dense) for b in blocks
    )
    assert size == header_bytes(wire, env) + cost.HEAD_COUNT_BYTES + len(blocks) * cost.HEAD_RECORD_BYTES + arrays


@pytest.mark.parametrize("dtype, dtype_bytes", [("float16", 2), ("float32", 4)])
def test_partial_bytes_match_wire_size(wire, dtype, dtype_bytes):
    blocks = [make_block(0, 1, 16, 16, 4), make_block(3, 1, 16, 16, 7)]
    partials = [torch.randn(1, 16, 16) for _ in blocks]
    env = envelope(wire)

    size = len(wire.encode_partials(env, blocks, partials, dtype=dtype))

    arrays = sum(cost.partial_bytes(b.batch, b.tokens, b.head_dim, b.rank, dtype_bytes) for b in blocks)
    assert size == header_bytes(wire, env) + cost.HEAD_COUNT_BYTES + len(blocks) * cost.HEAD_RECORD_BYTES + arrays


def test_frame_bytes_per_device_match_wire_size(wire):
    blocks = [make_block(0, 1, 16, 16, 4), make_block(1, 1, 16, 16, 5)]
    partials = [torch.randn(1, 16, 16) for _ in blocks]
    env = envelope(wire)

    sent = len(wire.encode_blocks(env, blocks)) + len(wire.encode_partials(env, blocks, partials))
    estimate = cost.frame_bytes_per_device(1, 16, 16, [4, 5])

    # Without envelope_bytes the estimate leaves out only the two envelopes.
    assert sent - estimate == 2 * header_bytes(wire, env)
    assert cost.frame_bytes_per_device(1, 16, 16, [4, 5], envelope_bytes=header_bytes(wire, env)) == sent


# FLOPs -------------------------------------------------------------------------------------------


def test_attention_flops_hand_computed():
    # b = 1, t = 4, d_h = 8, r = 2: V^T W 6*2*64 = 768, (U S)(V^T W) 6*4*2*8 = 384, scores and sum 4*16*8 = 512.
    assert cost.attention_flops(1, 4, 8, 2) == 768 + 384 + 512
    # Dense: Y W 6*4*64 = 1536, plus 512.
    assert cost.attention_flops(1, 4, 8, None) == 1536 + 512


@pytest.mark.parametrize(
    "batch, tokens, head_dim",
    [(1, 196, 64), (8, 196, 16), (1, 64, 32), (4, 16, 16), (1, 1024, 128)],
)
def test_attention_flops_factor_form_cheaper(batch, tokens, head_dim):
    dense = cost.attention_flops(batch, tokens, head_dim, None)
    for rank in range(1, head_dim // 2):
        assert cost.attention_flops(batch, tokens, head_dim, rank) < dense, f"rank {rank}"


def test_attention_flops_match_model(small_model):
    images = torch.randn(2, 1, 64, 64)
    blocks, _ = small_model.compress(images)

    for block in blocks:
        expected = cost.attention_flops(block.batch, block.tokens, block.head_dim, block.rank)
        assert counted_flops(small_model.head_forward, block) == expected, f"head {block.head} rank {block.rank}"


def test_attention_flops_dense_match_model(small_model):
    images = torch.randn(2, 1, 64, 64)
    blocks, _ = small_model.compress(images, phi=None)

    counted = counted_flops(small_model.head_forward, blocks[0])

    assert counted == cost.attention_flops(2, SMALL.tokens, SMALL.head_dim, None)


@pytest.mark.parametrize("phi", [0.9, None])
def test_rest_flops_match_model(small_model, phi):
    images = torch.randn(2, 1, 64, 64)
    blocks, _ = small_model.compress(images, phi=phi)
    partials = [small_model.head_forward(block) for block in blocks]

    counted = counted_flops(small_model.aggregate, blocks, partials)

    ranks = None if phi is None else [block.rank for block in blocks]
    expected = cost.rest_flops(
        2, SMALL.tokens, SMALL.dim, SMALL.heads, ranks, SMALL.mlp_ratio, SMALL.local_blocks, pool=SMALL.pool
    )
    assert counted == expected


def test_rest_flops_hand_computed():
    # b = 1, t = 4, d = 8, h = 2 (d_h = 4), r = 1, ratio 2 (hidden 16), one local block, 2 classes.
    reconstruct = 2 * (2 * 4 * 1 * 4)
    projection = 2 * 4 * 64
    mlp = 4 * 4 * 8 * 16
    local = 6 * 4 * 64 + 4 * 1 * 16 * 8 + 2 * 4 * 64 + 4 * 4 * 8 * 16
    classifier = 2 * 1 * 8 * 2
    expected = reconstruct + projection + mlp + local + classifier

    assert cost.rest_flops(1, 4, 8, 2, rank=1, pool="mean") == expected
    assert cost.rest_flops(1, 4, 8, 2, rank=1, pool="meanmax") == expected + classifier
    assert cost.rest_flops(1, 4, 8, 2, rank=None, pool="mean") == expected - reconstruct
    assert cost.rest_flops(1, 4, 8, 2, rank=1, local_blocks=0, pool="mean") == expected - local


def test_rank_reduction_flops_hand_computed():
    # One head of m = 6, n = 4, r = 2 with no oversampling, so k = 2.
    kwargs = {"oversample": 0}
    # gram: 2*6*16 + 9*64 + 2*6*4*2 = 192 + 576 + 96
    assert cost.rank_reduction_flops(1, 6, 4, 1, 2, "gram") == 864
    # exact: 6*6*16 + 20*64
    assert cost.rank_reduction_flops(1, 6, 4, 1, 2, "exact") == 576 + 1280
    # randomized, 1 power iteration: products 2*6*4*2*4 = 384, QRs 2*96 + 64 = 256,
    # SVD of the 2 x 4 projection 6*4*4 + 20*8 = 256, U 2*6*2*2 = 48.
    assert cost.rank_reduction_flops(1, 6, 4, 1, 2, "randomized", iterations=1, **kwargs) == 944
    # subspace, 1 step: 6*6*4*2 + 4*6*4 + 4*4*4 + 2*4*4 + 26*8 = 688, then U and V 2*10*2*2 = 80.
    assert cost.rank_reduction_flops(1, 6, 4, 1, 2, "subspace", iterations=1, **kwargs) == 768
    # adamatrix, 3 steps: QRs 4*6*4 + 4*4*4 = 160 per step and once at the start, 10*6*4*2 = 480 per step.
    assert cost.rank_reduction_flops(1, 6, 4, 1, 2, "adamatrix", iterations=3, **kwargs) == 3 * 640 + 160


def test_rank_reduction_flops_sums_heads():
    one = cost.rank_reduction_flops(1, 196, 32, 1, 5, "gram")
    other = cost.rank_reduction_flops(1, 196, 32, 1, 9, "gram")

    assert cost.rank_reduction_flops(1, 196, 64, 2, 5, "gram") == 2 * one
    assert cost.rank_reduction_flops(1, 196, 64, 2, [5, 9], "gram") == one + other


def test_rank_reduction_flops_auto_follows_lowrank():
    assert cost.rank_reduction_flops(8, 196, 96, 6, 4) == cost.rank_reduction_flops(8, 196, 96, 6, 4, "gram")
    cold = cost.rank_reduction_flops(1, 196, 768, 1, 12)
    warm = cost.rank_reduction_flops(1, 196, 768, 1, 12, warm_start=True)
    assert cold == cost.rank_reduction_flops(1, 196, 768, 1, 12, "randomized")
    assert warm == cost.rank_reduction_flops(1, 196, 768, 1, 12, "subspace")


def test_rank_reduction_flops_randomized_below_exact():
    exact = cost.rank_reduction_flops(1, 196, 768, 1, 12, "exact")

    assert cost.rank_reduction_flops(1, 196, 768, 1, 12, "randomized") < exact / 5
    assert cost.rank_reduction_flops(1, 196, 768, 1, 12, "subspace") < exact / 5


def test_rank_reduction_gram_products_match_counter():
    # The counter records the Gram product and the U product. The eigendecomposition is the 9 n^3 estimate.
    generator = torch.Generator().manual_seed(3)
    Y = torch.randn(64, 16, generator=generator) @ torch.randn(16, 16, generator=generator)

    with FlopCounterMode(display=False) as counter:
        result = lowrank.truncated_svd(Y, 0.9, method="gram")

    estimate = cost.rank_reduction_flops(1, 64, 16, 1, result.rank, "gram")
    assert counter.get_total_flops() == estimate - 9 * 16**3


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cost.rank_reduction_flops(1, 16, 32, 2, 4, "qr"), "unknown rank-reduction method"),
        (lambda: cost.rank_reduction_flops(1, 16, 32, 3, 4), "not divisible"),
        (lambda: cost.rank_reduction_flops(1, 16, 32, 2, 17), "rank 17"),
        (lambda: cost.rank_reduction_flops(1, 16, 32, 2, [4]), "1 ranks for 2 heads"),
        (lambda: cost.rank_reduction_flops(1, 16, 32, 2, 4, "adamatrix", iterations=-1), "iterations"),
        (lambda: cost.attention_flops(0, 16, 8, 2), "batch"),
        (lambda: cost.attention_flops(1, 16, 8, 9), "rank 9"),
        (lambda: cost.rest_flops(1, 16, 32, 2, mlp_ratio=0.0), "mlp_ratio"),
        (lambda: cost.block_bytes(1, 16, 8, 2, dtype_bytes=3), "dtype_bytes"),
        (lambda: cost.block_bytes(1, 16, 8, 9), "rank 9"),
        (lambda: cost.frame_bytes_per_device(1, 16, 8, [2], envelope_bytes=-1), "envelope_bytes"),
    ],
)
def test_cost_rejects_invalid_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# Energy ------------------------------------------------------------------------------------------


def test_energy_estimate_hand_computed():
    # m = 4, n = 3, r = 1, T = 2: FLOPs 2*4*3*1 + 2*1*7 = 38; M = 2 blocks of 3 x 3 float16 words
    # = 2*9*16 = 288 bits; words saved 12 - (4 + 3) = 5.
    terms = cost.energy_estimate(4, 3, 1, 2, 2, 3, alpha_flop_j=1.0, gamma_bit_j=1.0, delta_access_j=1.0)

    assert terms == {"compute_j": 38.0, "transfer_j": 288.0, "memory_j": 5.0, "total_j": 331.0}


def test_energy_estimate_uses_example_constants():
    default = cost.energy_estimate(196, 768, 12, 2, 4, 64)
    explicit = cost.energy_estimate(
        196, 768, 12, 2, 4, 64,
        alpha_flop_j=cost.EXAMPLE_ALPHA_FLOP_J,
        gamma_bit_j=cost.EXAMPLE_GAMMA_BIT_J,
        delta_access_j=cost.EXAMPLE_DELTA_ACCESS_J,
    )
    assert default == explicit


@pytest.mark.parametrize("m, n, r", [(196, 768, 12), (1568, 16, 5), (64, 64, 31), (10, 10, 1)])
def test_energy_terms_non_negative(m, n, r):
    # r <= m n / (m + n), so the factors are no larger than the tokens.
    terms = cost.energy_estimate(m, n, r, iterations=30, devices=4, block_side=32)

    for name, value in terms.items():
        assert value >= 0.0, name


@pytest.mark.parametrize(
    "constant, term",
    [("alpha_flop_j", "compute_j"), ("gamma_bit_j", "transfer_j"), ("delta_access_j", "memory_j")],
)
def test_energy_terms_linear_in_constant(constant, term):
    base = {"alpha_flop_j": 1e-11, "gamma_bit_j": 1e-9, "delta_access_j": 1e-9}
    single = cost.energy_estimate(196, 768, 12, 30, 4, 32, **base)
    tripled = cost.energy_estimate(196, 768, 12, 30, 4, 32, **{**base, constant: 3 * base[constant]})

    assert tripled[term] == pytest.approx(3 * single[term])
    for other in ("compute_j", "transfer_j", "memory_j"):
        if other != term:
            assert tripled[other] == single[other], other
    assert cost.energy_estimate(196, 768, 12, 30, 4, 32, **{**base, constant: 0.0})[term] == 0.0


def test_energy_transfer_counts_bits_per_word():
    words16 = cost.energy_estimate(8, 8, 2, 0, 3, 10, gamma_bit_j=1.0)["transfer_j"]
    words32 = cost.energy_estimate(8, 8, 2, 0, 3, 10, gamma_bit_j=1.0, bits_per_word=32)["transfer_j"]

    assert words16 == 3 * 100 * 16
    assert words32 == 2 * words16


def test_energy_memory_term_negative_for_large_rank():
    # m = n = 4, r = 3: the factors hold 24 words against 16 dense ones.
    assert cost.energy_estimate(4, 4, 3, 0, 0, 0, delta_access_j=1.0)["memory_j"] == -8.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 5}, "exceeds min"),
        ({"r": 0}, "r must be"),
        ({"iterations": -1}, "iterations"),
        ({"gamma_bit_j": -1e-9}, "gamma_bit_j"),
        ({"alpha_flop_j": float("inf")}, "alpha_flop_j"),
        ({"delta_access_j": float("nan")}, "delta_access_j"),
    ],
)
def test_energy_estimate_rejects_invalid_input(kwargs, message):
    arguments = {"m": 4, "n": 4, "r": 2, "iterations": 1, "devices": 2, "block_side": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        cost.energy_estimate(**arguments)
