"""Tests of rank selection and the truncated SVD methods, on real image tokens and small matrices.

The accuracy tests compare each method's Frobenius error with the optimum at the same rank
(Eckart-Young: the root of the discarded sigma^2), on token matrices of both shapes the project
uses: 196 x 768 ViT-B tokens and (b*t) x d_h head slices. See tests/conftest.py for how the tokens
are made from the inspection images.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdrm.lowrank import (
    METHODS,
    AdaMatrixConfig,
    LowRank,
    adamatrix_svd,
    compression_ratio,
    frobenius_error_bound,
    relative_error,
    select_rank,
    subspace_iteration,
    truncated_svd,
)

ACCURACY_PHIS = (0.9, 0.97, 0.99)
# A method passes when its error is at most 1 % above the optimal rank-r error.
ERROR_RATIO_LIMIT = 1.01

# (method, warm): warm methods start from the same method's result for the matrix plus 1 % noise.
METHOD_CASES = [
    ("exact", False),
    ("gram", False),
    ("randomized", False),
    ("subspace", False),
    ("subspace", True),
    ("adamatrix", False),
    ("adamatrix", True),
]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run this module's small matrix products on one thread, and restore the setting afterwards.

    On a 2-core machine that is also running other work, two torch threads per product made these
    tests about eight times slower in wall time than one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def optimal_error(Y: torch.Tensor, rank: int) -> float:
    """Return the Frobenius error of the best rank-r approximation of Y (computed in float64)."""
    return frobenius_error_bound(torch.linalg.svdvals(Y.to(torch.float64)), rank)


def absolute_error(Y: torch.Tensor, result: LowRank) -> float:
    """Return ||Y - U diag(S) V^T||_F."""
    return relative_error(Y, result) * float(torch.linalg.matrix_norm(Y.to(torch.float64)))


def perturbed(Y: torch.Tensor, level: float = 0.01, seed: int = 7) -> torch.Tensor:
    """Return Y plus Gaussian noise of `level` times its RMS entry, as the next frame of a stream."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(Y.shape, generator=generator, dtype=Y.dtype)
    return Y + level * Y.square().mean().sqrt() * noise


def warm_start_for(Y: torch.Tensor, phi: float, method: str) -> LowRank:
    """Return the result of `method` (exact for subspace) on a slightly different matrix."""
    previous = perturbed(Y)
    if method == "adamatrix":
        return truncated_svd(previous, phi, "adamatrix")
    return truncated_svd(previous, phi, "exact")


def assert_orthonormal_columns(matrix: torch.Tensor, name: str, atol: float = 1e-4) -> None:
    gram = matrix.to(torch.float64).T @ matrix.to(torch.float64)
    identity = torch.eye(gram.shape[0], dtype=torch.float64)
    deviation = float((gram - identity).abs().max()) if gram.numel() else 0.0
    assert deviation <= atol, f"{name} columns deviate from orthonormal by {deviation:.2e}"


# Accuracy on real token matrices ----------------------------------------------------------------


@pytest.mark.parametrize(("method", "warm"), METHOD_CASES, ids=[f"{m}-{'warm' if w else 'cold'}" for m, w in METHOD_CASES])
def test_method_error_near_optimum(token_matrices, method, warm, record_property):
    for name, Y in token_matrices.items():
        for phi in ACCURACY_PHIS:
            warm_start = warm_start_for(Y, phi, method) if warm else None
            result = truncated_svd(Y, phi, method, warm_start=warm_start)

            error = absolute_error(Y, result)
            optimum = optimal_error(Y, result.rank)
            record_property(f"{name} phi={phi} iterations", result.iterations)
            record_property(f"{name} phi={phi} error ratio", round(error / optimum, 5))
            print(f"{method} {'warm' if warm else 'cold'} {name} phi={phi}: rank {result.rank}, "
                  f"{result.iterations} iterations, error ratio {error / optimum:.5f}")

            assert result.rank >= 1, f"{name} phi={phi}: rank {result.rank}"
            if method in ("exact", "gram", "randomized"):
                assert result.energy >= phi * (1 - 1e-6), f"{name} phi={phi}: kept energy {result.energy:.6f}"
            else:
                # Iterative methods choose the rank from their own estimate of the spectrum.
                assert result.energy >= phi - 1e-3, f"{name} phi={phi}: kept energy {result.energy:.6f}"
            assert error <= ERROR_RATIO_LIMIT * optimum + 1e-6, (
                f"{method} on {name} at phi={phi}: error {error:.6g} exceeds 1.01 x the optimal "
                f"rank-{result.rank} error {optimum:.6g}"
            )


def test_exact_rank_matches_energy_rank(token_matrices):
    for name, Y in token_matrices.items():
        singular_values = torch.linalg.svdvals(Y.to(torch.float64))
        for phi in ACCURACY_PHIS:
            result = truncated_svd(Y, phi, "exact")
            assert result.rank == select_rank(singular_values, phi), f"{name} phi={phi}"


def test_adamatrix_plain_iteration_converges(token_matrices):
    # The plain gradient iteration separates nearly equal singular values slowly, so this checks
    # a 3 % bound instead of 1 %.
    config = AdaMatrixConfig(rayleigh_ritz=False)
    for name in ("boards 196x768", "elpv 196x64", "boards 1600x16"):
        Y = token_matrices[name]
        result = adamatrix_svd(Y, 0.9, config=config)
        error = absolute_error(Y, result)
        optimum = optimal_error(Y, result.rank)
        assert error <= 1.03 * optimum, f"{name}: error ratio {error / optimum:.4f}"
        assert result.iterations < config.max_iterations, f"{name}: hit the iteration cap"


def test_adamatrix_records_loss_history(token_matrices):
    Y = token_matrices["defect 196x64"]
    result = adamatrix_svd(Y, 0.9)
    assert len(result.loss_history) == result.iterations
    assert result.loss_history[-1] < result.loss_history[0]


def test_adamatrix_iteration_cap(token_matrices):
    Y = token_matrices["boards 196x768"]
    result = adamatrix_svd(Y, 0.99, config=AdaMatrixConfig(max_iterations=5))
    assert result.iterations <= 5
    assert torch.isfinite(result.S).all()


def test_adamatrix_mismatched_warm_start_ignored(token_matrices):
    Y = token_matrices["elpv 196x64"]
    other = truncated_svd(token_matrices["elpv 64x16"], 0.9, "exact")
    result = truncated_svd(Y, 0.9, "adamatrix", warm_start=other)
    cold = truncated_svd(Y, 0.9, "adamatrix")
    assert result.iterations == cold.iterations
    assert absolute_error(Y, result) <= ERROR_RATIO_LIMIT * optimal_error(Y, result.rank)


def test_exact_error_equals_bound(token_matrices):
    for name, Y in token_matrices.items():
        Y64 = Y.to(torch.float64)
        for phi in ACCURACY_PHIS:
            result = truncated_svd(Y64, phi, "exact")
            bound = frobenius_error_bound(torch.linalg.svdvals(Y64), result.rank)
            assert absolute_error(Y64, result) == pytest.approx(bound, rel=1e-5), f"{name} phi={phi}"


# Warm starts on a slowly changing stream -----------------------------------------------------------


@pytest.mark.parametrize("phi", ACCURACY_PHIS)
def test_subspace_warm_start_needs_fewer_iterations(shifted_token_streams, phi, record_property):
    cold_total = 0
    warm_total = 0
    for name, frames in shifted_token_streams.items():
        previous = truncated_svd(frames[0], phi, "exact")
        for Y in frames[1:]:
            cold = subspace_iteration(Y, phi, None)
            warm = subspace_iteration(Y, phi, previous.V)
            cold_total += cold.iterations
            warm_total += warm.iterations
            assert absolute_error(Y, warm) <= ERROR_RATIO_LIMIT * optimal_error(Y, warm.rank), name
            previous = warm
    record_property("cold iterations", cold_total)
    record_property("warm iterations", warm_total)
    print(f"subspace phi={phi}: cold {cold_total} iterations, warm {warm_total}")
    assert warm_total < cold_total


@pytest.mark.parametrize("phi", ACCURACY_PHIS)
def test_adamatrix_warm_start_needs_fewer_iterations(shifted_token_streams, phi, record_property):
    cold_total = 0
    warm_total = 0
    for name, frames in shifted_token_streams.items():
        previous = truncated_svd(frames[0], phi, "adamatrix")
        for index, Y in enumerate(frames[1:], start=1):
            cold = truncated_svd(Y, phi, "adamatrix")
            warm = truncated_svd(Y, phi, "adamatrix", warm_start=previous)
            cold_total += cold.iterations
            warm_total += warm.iterations
            assert warm.iterations < cold.iterations, f"{name} frame {index}: {warm.iterations} vs {cold.iterations}"
            assert absolute_error(Y, warm) <= ERROR_RATIO_LIMIT * optimal_error(Y, warm.rank), name
            previous = warm
    record_property("cold iterations", cold_total)
    record_property("warm iterations", warm_total)
    print(f"adamatrix phi={phi}: cold {cold_total} iterations, warm {warm_total}")
    assert warm_total <= 0.6 * cold_total


def test_adamatrix_exact_warm_start_stops_early(token_matrices):
    Y = token_matrices["boards 196x768"]
    exact = truncated_svd(Y, 0.9, "exact")
    result = truncated_svd(Y, 0.9, "adamatrix", warm_start=exact)
    assert result.iterations <= 2
    assert result.rank == exact.rank


# Properties on small matrices ---------------------------------------------------------------------

PROPERTY_SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def small_matrices(draw) -> torch.Tensor:
    """Small matrices with integer entries in [-5, 5] (zeros, ties and rank deficiency included)."""
    rows = draw(st.integers(1, 12))
    cols = draw(st.integers(1, 12))
    entries = draw(st.lists(st.integers(-5, 5), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(entries, dtype=torch.float32).reshape(rows, cols)


@st.composite
def spectra(draw) -> torch.Tensor:
    """Non-increasing, non-negative singular values, possibly with ties and zeros."""
    values = draw(st.lists(st.floats(0.0, 100.0, allow_nan=False, allow_subnormal=False), min_size=1, max_size=20))
    return torch.tensor(sorted(values, reverse=True), dtype=torch.float64)


phis = st.floats(0.05, 1.0, allow_nan=False)


@PROPERTY_SETTINGS
@given(values=spectra(), phi=phis, min_rank=st.integers(1, 4), extra=st.integers(0, 8))
def test_select_rank_properties(values, phi, min_rank, extra):
    max_rank = min_rank + extra
    rank = select_rank(values, phi, min_rank, max_rank)
    energies = values.square()
    total = float(energies.sum())

    assert min(min_rank, values.numel()) <= rank <= min(max_rank, values.numel())
    if total > 0 and rank < min(max_rank, values.numel()):
        assert float(energies[:rank].sum()) >= phi * total * (1 - 1e-9)
    if total > 0 and rank > min_rank:
        assert float(energies[: rank - 1].sum()) < phi * total


@PROPERTY_SETTINGS
@given(values=spectra(), low=phis, high=phis)
def test_select_rank_monotone_in_phi(values, low, high):
    low, high = sorted((low, high))
    assert select_rank(values, low) <= select_rank(values, high)


@PROPERTY_SETTINGS
@given(Y=small_matrices(), phi=phis, min_rank=st.integers(1, 3), extra=st.integers(0, 6), method=st.sampled_from(METHODS))
def test_truncated_svd_factor_properties(Y, phi, min_rank, extra, method):
    max_rank = min_rank + extra
    result = truncated_svd(Y, phi, method, min_rank=min_rank, max_rank=max_rank)
    smaller = min(Y.shape)

    assert min(min_rank, smaller) <= result.rank <= min(max_rank, smaller)
    assert result.U.shape == (Y.shape[0], result.rank)
    assert result.V.shape == (Y.shape[1], result.rank)
    assert result.S.shape == (result.rank,)
    assert torch.isfinite(result.U).all()
    assert torch.isfinite(result.S).all()
    assert torch.isfinite(result.V).all()
    assert_orthonormal_columns(result.U, "U")
    assert_orthonormal_columns(result.V, "V")
    assert (result.S >= 0).all()
    assert (result.S[:-1] >= result.S[1:] - 1e-5 * float(result.S.max())).all()
    assert 0.0 <= result.energy <= 1.0


@PROPERTY_SETTINGS
@given(Y=small_matrices(), phi=phis, method=st.sampled_from(["exact", "gram"]))
def test_direct_methods_minimal_rank(Y, phi, method):
    result = truncated_svd(Y, phi, method)
    singular_values = torch.linalg.svdvals(Y.to(torch.float64))
    energies = singular_values.square()
    total = float(energies.sum())
    if total == 0.0:
        assert result.rank == 1
        return

    kept = float(energies[: result.rank].sum())
    assert kept >= phi * total * (1 - 1e-5)
    assert result.energy >= phi * (1 - 1e-5)
    if result.rank > 1:
        # rank - 1 values fall short of phi (up to float32 rounding of the computed spectrum).
        assert float(energies[: result.rank - 1].sum()) < phi * total * (1 + 1e-5)


@PROPERTY_SETTINGS
@given(Y=small_matrices(), low=phis, high=phis)
def test_exact_rank_monotone_in_phi(Y, low, high):
    low, high = sorted((low, high))
    assert truncated_svd(Y, low, "exact").rank <= truncated_svd(Y, high, "exact").rank


@PROPERTY_SETTINGS
@given(Y=small_matrices(), phi=phis, exponent=st.integers(-12, 12), method=st.sampled_from(METHODS))
def test_scaling_keeps_rank(Y, phi, exponent, method):
    # Powers of two scale every rounding step exactly, so the rank must not change at all.
    scale = 2.0**exponent
    assert truncated_svd(scale * Y, phi, method).rank == truncated_svd(Y, phi, method).rank


@PROPERTY_SETTINGS
@given(Y=small_matrices(), phi=st.floats(0.05, 0.95), scale=st.floats(0.01, 100.0))
def test_exact_scaling_keeps_rank(Y, phi, scale):
    singular_values = torch.linalg.svdvals(Y.to(torch.float64))
    cumulative = torch.cumsum(singular_values.square(), 0) / singular_values.square().sum().clamp_min(1e-300)
    # Skip draws where phi sits within rounding of a cumulative energy level.
    if float(singular_values.sum()) == 0.0 or float((cumulative - phi).abs().min()) < 1e-4:
        return
    assert truncated_svd(scale * Y, phi, "exact").rank == truncated_svd(Y, phi, "exact").rank


# Input checks and the zero matrix -------------------------------------------------------------------


@pytest.mark.parametrize("phi", [0.0, -0.1, 1.1, math.nan, math.inf])
def test_select_rank_rejects_invalid_phi(phi):
    with pytest.raises(ValueError, match="phi"):
        select_rank(torch.tensor([3.0, 2.0, 1.0]), phi)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_select_rank_rejects_non_finite_values(bad):
    with pytest.raises(ValueError, match="NaN or Inf"):
        select_rank(torch.tensor([3.0, bad, 1.0]), 0.9)


def test_select_rank_rejects_invalid_ranks():
    values = torch.tensor([3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="min_rank"):
        select_rank(values, 0.9, min_rank=0)
    with pytest.raises(ValueError, match="max_rank"):
        select_rank(values, 0.9, min_rank=3, max_rank=2)


def test_select_rank_rejects_empty_spectrum():
    with pytest.raises(ValueError, match="empty"):
        select_rank(torch.zeros(0), 0.9)


def test_select_rank_rejects_invalid_total_energy():
    with pytest.raises(ValueError, match="total_energy"):
        select_rank(torch.tensor([1.0]), 0.9, total_energy=-1.0)
    with pytest.raises(ValueError, match="total_energy"):
        select_rank(torch.tensor([1.0]), 0.9, total_energy=math.nan)


def test_select_rank_zero_spectrum():
    zeros = torch.zeros(5)
    assert select_rank(zeros, 0.9) == 1
    assert select_rank(zeros, 0.9, min_rank=3) == 3
    assert select_rank(zeros, 0.9, min_rank=3, max_rank=4) == 3
    # min_rank is clamped to the number of values.
    assert select_rank(torch.zeros(2), 0.9, min_rank=4) == 2


def test_select_rank_uses_given_total_energy():
    leading = torch.tensor([3.0, 1.0])
    # 9 of 10 units of energy sit in the first value; with a total of 20 even both fall short.
    assert select_rank(leading, 0.9, total_energy=10.0) == 1
    assert select_rank(leading, 0.9, total_energy=20.0) == 2


def test_select_rank_hand_computed():
    values = torch.tensor([4.0, 2.0, 1.0])  # energies 16, 4, 1 of 21
    assert select_rank(values, 16 / 21) == 1
    assert select_rank(values, 0.8) == 2
    assert select_rank(values, 1.0) == 3
    assert select_rank(values, 1.0, max_rank=2) == 2


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 7), (196, 16)])
def test_zero_matrix_for_every_method(method, shape):
    Y = torch.zeros(shape)
    result = truncated_svd(Y, 0.9, method, min_rank=2)
    expected_rank = min(2, min(shape))

    assert result.rank == expected_rank
    assert torch.equal(result.S, torch.zeros(expected_rank))
    assert torch.isfinite(result.U).all()
    assert torch.isfinite(result.V).all()
    assert_orthonormal_columns(result.U, "U")
    assert_orthonormal_columns(result.V, "V")
    assert result.energy == 1.0
    assert relative_error(Y, result) == 0.0


def test_adamatrix_zero_matrix_called_directly():
    result = adamatrix_svd(torch.zeros(8, 4), 0.9)
    assert result.method == "adamatrix"
    assert result.rank == 1
    assert float(result.S.abs().sum()) == 0.0


def test_truncated_svd_rejects_3d_input():
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(torch.ones(2, 3, 4), 0.9)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_truncated_svd_rejects_non_finite_input(bad):
    Y = torch.ones(4, 3)
    Y[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        truncated_svd(Y, 0.9)


def test_truncated_svd_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown rank-reduction method 'qr'"):
        truncated_svd(torch.ones(4, 3), 0.9, method="qr")


def test_truncated_svd_rejects_empty_matrix():
    with pytest.raises(ValueError, match="at least one row"):
        truncated_svd(torch.zeros(0, 3), 0.9)


def test_truncated_svd_rejects_invalid_phi():
    with pytest.raises(ValueError, match="phi"):
        truncated_svd(torch.ones(4, 3), 1.5)


# Compression ratio --------------------------------------------------------------------------------


def test_compression_ratio_hand_computed():
    # b*t*d = 1*196*768 = 150528; b*t*r + r + r*d = 1960 + 10 + 7680 = 9650.
    assert compression_ratio(1, 196, 768, 10) == pytest.approx(150528 / 9650)
    # 2*4*8 = 64; 2*4*2 + 2 + 2*8 = 34.
    assert compression_ratio(2, 4, 8, 2) == pytest.approx(64 / 34)


@pytest.mark.parametrize(("batch", "tokens", "features"), [(1, 196, 16), (8, 196, 64), (1, 1, 1)])
def test_compression_ratio_full_rank_below_one(batch, tokens, features):
    assert compression_ratio(batch, tokens, features, features) < 1.0


@pytest.mark.parametrize("arguments", [(0, 196, 768, 4), (1, 0, 768, 4), (1, 196, 0, 4), (1, 196, 768, 0), (-1, 196, 768, 4)])
def test_compression_ratio_rejects_invalid_sizes(arguments):
    with pytest.raises(ValueError, match="must be >= 1"):
        compression_ratio(*arguments)


def test_relative_error_of_zero_matrix_is_zero():
    result = truncated_svd(torch.zeros(3, 3), 0.9, "exact")
    assert relative_error(torch.zeros(3, 3), result) == 0.0


def test_token_embedding_is_layer_normalised(token_matrices):
    tokens = token_matrices["elpv 196x768"]
    assert float(tokens.mean(dim=1).abs().max()) < 1e-4
    # A black patch embeds to the zero token; every other token has unit standard deviation.
    deviations = tokens.std(dim=1)
    nonzero = deviations > 0.5
    assert bool(nonzero.any())
    assert torch.allclose(deviations[nonzero], torch.ones(int(nonzero.sum())), atol=1e-3)
