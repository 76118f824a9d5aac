"""Rank selection by energy and truncated SVD of a 2-D tensor by five methods.

For Y (m x n) with singular values sigma_1 >= ... >= sigma_p, p = min(m, n), the kept rank r is
the smallest r with

    sigma_1^2 + ... + sigma_r^2 >= phi * (sigma_1^2 + ... + sigma_p^2),   0 < phi <= 1,

and the truncation Y_r = U_r diag(S_r) V_r^T has the exact Frobenius error
||Y - Y_r||_F = sqrt(sigma_{r+1}^2 + ... + sigma_p^2) (Eckart-Young). The total energy is
sum sigma^2 = ||Y||_F^2, so methods that compute only the leading singular values still know it.

Methods:
- ``exact``: thin LAPACK SVD (torch.linalg.svd).
- ``gram``: eigendecomposition of the smaller Gram matrix (Y^T Y or Y Y^T). It is fastest when
  min(m, n) is small and loses accuracy only in directions far below the kept energy.
- ``randomized``: Halko-Martinsson-Tropp range finder with oversampling and power iterations; the
  sketch width grows until the kept energy reaches phi.
- ``subspace``: block power iteration warm-started from a previous result's V, with a
  Rayleigh-Ritz step; falls back to ``randomized`` without a warm start.
- ``adamatrix``: gradient iteration on U, S, V with Adam moments, Nesterov look-ahead, a momentum
  term, energy weights, an L1 penalty on S, QR re-orthonormalisation and a Rayleigh-Ritz step
  (see `adamatrix_svd`).
- ``auto``: ``gram`` when min(m, n) <= 64, else ``subspace`` with a warm start and ``randomized``
  without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

METHODS = ("exact", "gram", "randomized", "subspace", "adamatrix", "auto")
GRAM_MAX_SIDE = 64


@dataclass(frozen=True)
class LowRank:
    """Truncated SVD Y ~ U diag(S) V^T of an m x n matrix.

    U: (m, r) with orthonormal columns, S: (r,) non-negative and non-increasing, V: (n, r) with
    orthonormal columns. `energy` is the kept fraction sum(S^2) / ||Y||_F^2 (1.0 for a zero
    matrix), `iterations` the iterative steps taken (0 for direct methods), `total_energy`
    ||Y||_F^2.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    rank: int
    energy: float
    total_energy: float
    method: str
    iterations: int = 0
    loss_history: list[float] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class AdaMatrixConfig:
    """Settings of the AdaMatrix iteration, for Y scaled to unit Frobenius norm.

    lr: the largest Adam step size eta, in radians per step for a column of U or V and as a
        fraction of S_l for S. The SDRM paper (Du et al. 2025) uses 1e-4 on unscaled tokens, which
        needs tens of thousands of steps.
    error_scale: each column's step size is min(lr, error_scale * its estimated error), so steps
        shrink as the factors converge and a warm start is not thrown away by Adam's first steps,
        which have size eta whatever the gradient.
    beta1, beta2, eps: Adam moment decay rates and denominator guard.
    mu: the Nesterov look-ahead and momentum coefficient.
    lambda1: the L1 weight on S. It pulls each iterated S_l down by lambda1 / 2 (in units of
        ||Y||_F), but the returned values are Ritz values unless rayleigh_ritz is False.
    energy_weight: the scale of the energy-weighted term.
    s_floor: the guard added to S_l where the iteration divides by it.
    rayleigh_ritz: finish (and test convergence) with the SVD of the k x k matrix U^T Y V.
    tol: the convergence test on the r leading components (see `adamatrix_svd`). 3e-3 left the
        rank-r error within 0.3 % of the optimum on image token matrices.
    widen_tol: the test value below which a basis with fewer than `oversample` columns beyond the
        rank is widened early.
    window, stall_tol, lr_decay, max_decays: the stall rule. When the loss falls by less than
        stall_tol (relative) over `window` steps, lr is multiplied by lr_decay, and after
        max_decays such cuts the next stall stops the iteration.
    loss_threshold: the relative loss L / ||Y||_F^2 at which the iteration stops.
    max_iterations: the cap on the steps of one call, across all widenings.
    oversample: the columns iterated beyond the rank (a wider basis converges faster).
    """

    lr: float = 0.3
    error_scale: float = 1.0
    beta1: float = 0.7
    beta2: float = 0.9
    eps: float = 1e-8
    mu: float = 0.3
    lambda1: float = 1e-3
    energy_weight: float = 1.0
    s_floor: float = 1e-3
    rayleigh_ritz: bool = True
    tol: float = 3e-3
    widen_tol: float = 0.1
    window: int = 10
    stall_tol: float = 1e-4
    lr_decay: float = 0.5
    max_decays: int = 3
    loss_threshold: float = 0.0
    max_iterations: int = 1000
    oversample: int = 4
    seed: int = 0


def select_rank(
    singular_values: torch.Tensor,
    phi: float,
    min_rank: int = 1,
    max_rank: int | None = None,
    total_energy: float | None = None,
) -> int:
    """Return the smallest r with sum_{i<=r} sigma_i^2 >= phi * total, clamped to [min_rank, max_rank].

    singular_values: (p,) non-increasing, non-negative, p >= 1. total_energy defaults to
    sum(sigma^2); pass ||Y||_F^2 when only the leading values are known. A total energy of 0 (an
    all-zero matrix) leaves no energy to keep, so the result is min(min_rank, p); `truncated_svd`
    then returns S = 0. Raises ValueError for phi outside (0, 1], an empty spectrum, NaN or Inf
    values, a negative or non-finite total_energy, and min_rank < 1 or max_rank < min_rank.
    """
    _check_phi(phi)
    if min_rank < 1:
        raise ValueError(f"min_rank must be >= 1, got {min_rank}")
    if max_rank is not None and max_rank < min_rank:
        raise ValueError(f"max_rank {max_rank} is smaller than min_rank {min_rank}")

    values = singular_values.detach().to(torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("singular_values is empty: a matrix without rows or columns has no rank")
    if not torch.isfinite(values).all():
        raise ValueError("singular values contain NaN or Inf: check the input tokens for non-finite values")
    if total_energy is not None and not (math.isfinite(total_energy) and total_energy >= 0.0):
        raise ValueError(f"total_energy must be finite and >= 0, got {total_energy!r}")
    available = values.numel()
    upper = available if max_rank is None else min(max_rank, available)

    energies = values.square()
    cumulative = torch.cumsum(energies, dim=0)
    total = float(cumulative[-1]) if total_energy is None else float(total_energy)
    if total <= 0.0:
        return min(min_rank, available)

    # A relative slack of 1e-9 keeps phi = 1.0 reachable despite rounding in the running sum.
    target = phi * total * (1.0 - 1e-9)
    reached = torch.nonzero(cumulative >= target)
    rank = int(reached[0]) + 1 if reached.numel() else available
    return max(min(rank, upper), min(min_rank, available))


def truncated_svd(
    Y: torch.Tensor,
    phi: float,
    method: str = "auto",
    warm_start: LowRank | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    adamatrix: AdaMatrixConfig | None = None,
) -> LowRank:
    """Return the rank-r truncated SVD of Y (m x n) that keeps phi of its energy.

    warm_start: a previous result for a similar matrix of the same shape (used by ``subspace``,
    ``adamatrix`` and ``auto``). An all-zero Y gives rank min(min_rank, m, n), S = 0 and the
    leading columns of the identity as U and V, for every method. Raises ValueError for a
    non-2-D, empty or non-finite Y, an unknown method or phi outside (0, 1].
    """
    _check_phi(phi)
    if Y.ndim != 2:
        raise ValueError(f"Y must be a 2-D matrix, got shape {tuple(Y.shape)}")
    if min(Y.shape) == 0:
        raise ValueError(f"Y must have at least one row and one column, got shape {tuple(Y.shape)}")
    if method not in METHODS:
        raise ValueError(f"unknown rank-reduction method {method!r}; choose one of {', '.join(METHODS)}")
    if not torch.isfinite(Y).all():
        raise ValueError("Y contains NaN or Inf: the tokens of this frame are invalid")
    if warm_start is not None and warm_start.V.shape[0] != Y.shape[1]:
        warm_start = None

    if method == "auto":
        if min(Y.shape) <= GRAM_MAX_SIDE:
            method = "gram"
        elif warm_start is not None:
            method = "subspace"
        else:
            method = "randomized"

    if not Y.any():
        return _zero_result(Y, phi, min_rank, max_rank, method)
    if method == "exact":
        return _exact(Y, phi, min_rank, max_rank)
    if method == "gram":
        return _gram(Y, phi, min_rank, max_rank)
    if method == "randomized":
        return _randomized(Y, phi, min_rank, max_rank, seed=0)
    if method == "subspace":
        if warm_start is None:
            return _randomized(Y, phi, min_rank, max_rank, seed=0)
        return subspace_iteration(Y, phi, warm_start.V, min_rank=min_rank, max_rank=max_rank)
    return adamatrix_svd(Y, phi, warm_start=warm_start, min_rank=min_rank, max_rank=max_rank, config=adamatrix)


def frobenius_error_bound(singular_values: torch.Tensor, rank: int) -> float:
    """Return sqrt(sigma_{r+1}^2 + ... + sigma_p^2), the exact error of the best rank-r approximation."""
    tail = singular_values.detach().to(torch.float64)[rank:]
    return float(tail.square().sum().sqrt())


def compression_ratio(batch: int, tokens: int, features: int, rank: int) -> float:
    """Return CR = b*t*d / (b*t*r + r + r*d), the storage ratio of dense tokens to their factors.

    CR > 1 needs r < d (approximately); at r = d the factors are larger than the tokens.
    """
    if min(batch, tokens, features, rank) < 1:
        raise ValueError(f"batch, tokens, features and rank must be >= 1, got {batch}, {tokens}, {features}, {rank}")
    return batch * tokens * features / (batch * tokens * rank + rank + rank * features)


def relative_error(Y: torch.Tensor, result: LowRank) -> float:
    """Return ||Y - U diag(S) V^T||_F / ||Y||_F (0 for a zero Y)."""
    norm = float(torch.linalg.matrix_norm(Y.to(torch.float64)))
    if norm == 0.0:
        return 0.0
    approx = (result.U.to(torch.float64) * result.S.to(torch.float64)) @ result.V.to(torch.float64).T
    return float(torch.linalg.matrix_norm(Y.to(torch.float64) - approx)) / norm


# Direct methods ----------------------------------------------------------------------------------


def _exact(Y: torch.Tensor, phi: float, min_rank: int, max_rank: int | None) -> LowRank:
    U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
    total = float(S.to(torch.float64).square().sum())
    rank = select_rank(S, phi, min_rank, max_rank)
    return _result(U[:, :rank], S[:rank], Vh[:rank].T, total, "exact", 0)


def _gram(Y: torch.Tensor, phi: float, min_rank: int, max_rank: int | None) -> LowRank:
    """Eigendecompose the smaller Gram matrix: Y^T Y = V diag(S^2) V^T, then U = Y V / S."""
    rows, cols = Y.shape
    tall = rows >= cols
    gram = Y.T @ Y if tall else Y @ Y.T
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.flip(0).clamp_min(0.0)
    vectors = vectors.flip(1)
    S = eigenvalues.sqrt()

    total = float(Y.to(torch.float64).square().sum())
    rank = select_rank(S, phi, min_rank, max_rank, total_energy=total)
    S = S[:rank]
    kept = vectors[:, :rank]
    safe = torch.where(S > 0, S, torch.ones_like(S))

    # QR restores orthonormal columns where S is 0 or so small that Y V / S is mostly rounding.
    if tall:
        V = kept
        U = _orthonormal((Y @ V) / safe)
    else:
        U = kept
        V = _orthonormal((Y.T @ U) / safe)
    return _result(U, S, V, total, "gram", 0)


# Randomized and subspace iteration ---------------------------------------------------------------


def _randomized(
    Y: torch.Tensor,
    phi: float,
    min_rank: int,
    max_rank: int | None,
    seed: int,
    power_iterations: int = 2,
    oversample: int = 8,
    initial_width: int = 16,
) -> LowRank:
    """Halko-Martinsson-Tropp: sketch the range of Y, orthonormalise, SVD the small projection.

    The sketch width k starts at `initial_width` and doubles until the leading k singular values
    hold phi of ||Y||_F^2; once k reaches half of min(m, n) the exact SVD is cheaper.
    """
    rows, cols = Y.shape
    smaller = min(rows, cols)
    total = float(Y.to(torch.float64).square().sum())
    generator = torch.Generator(device="cpu").manual_seed(seed)
    width = min(initial_width + oversample, smaller)
    iterations = 0

    while True:
        if 2 * width > smaller:
            exact = _exact(Y, phi, min_rank, max_rank)
            return _result(exact.U, exact.S, exact.V, total, "randomized", iterations)

        omega = torch.randn(cols, width, generator=generator, dtype=Y.dtype).to(Y.device)
        basis, _ = torch.linalg.qr(Y @ omega)
        for _ in range(power_iterations):
            right, _ = torch.linalg.qr(Y.T @ basis)
            basis, _ = torch.linalg.qr(Y @ right)
            iterations += 1
        small = basis.T @ Y
        Ub, S, Vh = torch.linalg.svd(small, full_matrices=False)

        kept = float(S[: width - oversample].to(torch.float64).square().sum())
        if total == 0.0 or kept >= phi * total * (1.0 - 1e-9):
            rank = select_rank(S, phi, min_rank, max_rank, total_energy=total)
            U = basis @ Ub[:, :rank]
            return _result(U, S[:rank], Vh[:rank].T, total, "randomized", iterations)
        width = min(2 * width, smaller)


def subspace_iteration(
    Y: torch.Tensor,
    phi: float,
    V0: torch.Tensor | None,
    min_rank: int = 1,
    max_rank: int | None = None,
    oversample: int = 4,
    tol: float = 1e-3,
    max_iterations: int = 50,
    seed: int = 0,
    residual_tol: float = 3e-3,
) -> LowRank:
    """Block power iteration on Y from a start basis V0 (n x r0), with a Rayleigh-Ritz step.

    Each step maps the right basis through Y and Y^T and re-orthonormalises it. The Rayleigh-Ritz
    step takes the SVD of the small k x k matrix Q_U^T Y Q_V. Once the leading r Ritz values hold
    phi of ||Y||_F^2, the iteration stops at the first of two tests. The residual test
    ||Y V_r - U_r S_r||_F^2 <= residual_tol * (||Y||_F^2 - sum S_r^2) lets a good warm start stop
    after one step. (Y^T U_r = V_r S_r holds exactly after each step, so that is the whole
    residual.) The other test passes when the leading r Ritz values change by less than `tol`
    (relative) between steps. V0 None starts from a random basis (a cold start, for comparison).
    """
    rows, cols = Y.shape
    smaller = min(rows, cols)
    total = float(Y.to(torch.float64).square().sum())
    generator = torch.Generator(device="cpu").manual_seed(seed)

    start_rank = 8 if V0 is None else V0.shape[1]
    width = min(start_rank + oversample, smaller)
    if V0 is None:
        basis_right = torch.randn(cols, width, generator=generator, dtype=Y.dtype).to(Y.device)
    else:
        extra = width - V0.shape[1]
        padding = torch.randn(cols, max(extra, 0), generator=generator, dtype=Y.dtype).to(Y.device)
        basis_right = torch.cat([V0.to(Y.dtype)[:, :width], padding], dim=1)
    basis_right, _ = torch.linalg.qr(basis_right)

    previous: torch.Tensor | None = None
    iterations = 0
    product = Y @ basis_right
    while True:
        basis_left, _ = torch.linalg.qr(product)
        mapped = Y.T @ basis_left
        basis_right, _ = torch.linalg.qr(mapped)
        iterations += 1

        # Q_U^T Y Q_V = (Q_V^T Y^T Q_U)^T reuses Y^T Q_U.
        Ub, S, Vh = torch.linalg.svd((basis_right.T @ mapped).T, full_matrices=False)
        rank = select_rank(S, phi, min_rank, max_rank, total_energy=total)
        kept = float(S[:rank].to(torch.float64).square().sum())
        reached = total == 0.0 or kept >= phi * total * (1.0 - 1e-9)

        if reached and rank >= width - 1 and width < smaller:
            width = min(width + max(oversample, rank // 2), smaller)
            padding = torch.randn(cols, width - basis_right.shape[1], generator=generator, dtype=Y.dtype)
            basis_right, _ = torch.linalg.qr(torch.cat([basis_right, padding.to(Y.device)], dim=1))
            product = Y @ basis_right
            previous = None
            continue
        if not reached and width < smaller:
            width = min(2 * width, smaller)
            padding = torch.randn(cols, width - basis_right.shape[1], generator=generator, dtype=Y.dtype)
            basis_right, _ = torch.linalg.qr(torch.cat([basis_right, padding.to(Y.device)], dim=1))
            product = Y @ basis_right
            previous = None
            continue

        # Y Q_V is also the first product of the next step.
        product = Y @ basis_right
        U = basis_left @ Ub[:, :rank]
        V = basis_right @ Vh[:rank].T
        residual = product @ Vh[:rank].T - U * S[:rank]
        tail = max(total - kept, 1e-12 * total)
        small_residual = float(residual.to(torch.float64).square().sum()) <= residual_tol * tail
        settled = previous is not None and _relative_change(S[:rank], previous[:rank]) < tol
        if small_residual or settled or iterations >= max_iterations:
            return _result(U, S[:rank], V, total, "subspace", iterations)
        previous = S


# AdaMatrix ----------------------------------------------------------------------------------------

# The iteration runs in float32 on Y scaled to ||Y||_F = 1, so energies are known to about 1e-6:
# rank selection counts 1 - 1e-6 as all of the energy, and the convergence test measures residuals
# against a rank-r error of at least 1e-6.
_ADAMATRIX_ENERGY_SLACK = 1e-6


def adamatrix_svd(
    Y: torch.Tensor,
    phi: float,
    warm_start: LowRank | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    config: AdaMatrixConfig | None = None,
) -> LowRank:
    """Solve the truncated SVD by the AdaMatrix gradient iteration (SDRM, Du et al. 2025).

    Y is scaled to unit Frobenius norm (the result is scaled back) and the iteration runs in
    float32. With k = r + oversample columns, U (m x k) and V (n x k) orthonormal and S (k,), the
    minimised loss is

        L = ||U S V^T - Y||_F^2 + ||(U S - Y V) (.) W||_F^2 + lambda1 ||S||_1,

    where W_{jl} = sqrt(energy_weight * w_l) and w_l = S_l^2 / sum S^2 is the normalised energy of
    component l, so high-energy directions weigh more. Because ||U S V^T - Y||_F^2 =
    ||U S - Y V||_F^2 + ||Y (I - V V^T)||_F^2 for orthonormal V, the weighted term shares its
    minimiser with the plain residual, and the optimum stays the truncated SVD (up to the small
    L1 shrinkage of S).

    Corrections to the paper: its loss writes -lambda1 ||S||_1, which rewards large S; the penalty
    here is +lambda1 ||S||_1 with subgradient +lambda1 sign(S). Its nuclear-norm terms on U and V
    are constant (= k) after the QR step, so they contribute no gradient and are left out.

    Gradients (R = U S V^T - Y, P = (U S - Y V) diag(energy_weight * w)):
        dL/dU = 2 R V S + 2 P S,   dL/dS = 2 diag(U^T R V) + 2 diag(U^T P) + lambda1 sign(S),
        dL/dV = 2 R^T U S - 2 Y^T P.
    Each step evaluates them at the Nesterov look-ahead point (X - mu * d_prev for X in U, S, V),
    updates the Adam moments m and v with bias correction by the step count t, takes
    d = eta * m_hat / (sqrt(v_hat) + eps) + mu * d_prev, subtracts d, and re-orthonormalises U
    and V by QR with the signs fixed by diag(R).

    Choices that make the iteration converge from a random start (see `AdaMatrixConfig`):
    - The U and V gradients are divided column by column by |S_l| + s_floor. Both are
      proportional to S_l, so without this a column whose S_l is still small barely moves and
      stays unaligned at a saddle point.
    - Adam keeps one second moment per column of U and V (the mean of g^2 over the column), so a
      column moves along its gradient. With per-entry scaling and beta2 = 0.9 the step is close to
      sign(g), whose deviation from the gradient adds error to every column.
    - Each column has its own step size eta_l = min(lr, error_scale * e_l). For U and V, e_l is the
      angle estimate ||(Y V - U S)_l, (Y^T U - V S)_l|| / S_l; for S it is |S_l - u_l^T Y v_l| / S_l,
      and S steps are relative (eta_l S_l), so S stays positive. Steps shrink as the factors
      converge, and Adam's first steps (of size eta whatever the gradient) leave a warm start
      intact.
    - beta1 = 0.7 and beta2 = 0.9 let the moments follow the shrinking gradient. With the usual
      0.9 and 0.999 the iteration needed more than twice the steps on image token matrices.
    - A cold start draws S from |N(0, 1)| / sqrt(k), so sum S^2 is near ||Y||_F^2 = 1. Columns added
      to a warm start or a widened basis start at the RMS of the energy that S does not hold yet.
    - A Rayleigh-Ritz step (the SVD of the k x k matrix Q_U^T Y Q_V on the orthonormalised bases)
      gives the result and the triplets that the convergence test checks. Gradient steps separate
      two nearly equal singular values only at a rate proportional to their gap. At the rank cut
      such a pair changes the rank-r error, and the Ritz step resolves it exactly within the basis.
      `rayleigh_ritz=False` returns the iterated U, S, V instead.

    The iteration stops at the first of these rules:
    - convergence: the r leading triplets satisfy
      ||Y V_r - U_r S_r||_F^2 + ||Y^T U_r - V_r S_r||_F^2 <= tol * ||Y - U_r S_r V_r^T||_F^2.
      It looks at the leading r only because the oversampling columns converge slowly where the
      spectrum is flat, and they do not enter the result;
    - L / ||Y||_F^2 <= loss_threshold;
    - stall: whenever the loss falls by less than stall_tol (relative) over `window` steps, the step
      size is multiplied by lr_decay, and the stall after max_decays such cuts stops the iteration.
      A single rise of the loss does not cut the step, because the loss rises briefly while a
      component leaves a saddle point;
    - max_iterations steps in all.
    When the k values of S cannot hold phi of the energy, or the test value is below widen_tol with
    fewer than `oversample` columns beyond the rank, k doubles and the iteration continues from the
    current factors with fresh Adam moments.
    """
    config = config or AdaMatrixConfig()
    rows, cols = Y.shape
    smaller = min(rows, cols)
    total = float(Y.to(torch.float64).square().sum())
    if total == 0.0:
        return _zero_result(Y, phi, min_rank, max_rank, "adamatrix")

    scale = math.sqrt(total)
    # NOTE: the iteration runs on Y's device, but only the CPU path has been run so far.
    target = (Y / scale).to(torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    if warm_start is not None and warm_start.U.shape[0] == rows and warm_start.rank > 0:
        previous_rank = min(warm_start.rank, smaller)
        width = min(previous_rank + config.oversample, smaller)
        U = _pad_orthonormal(warm_start.U.to(target)[:, :previous_rank], width, generator)
        V = _pad_orthonormal(warm_start.V.to(target)[:, :previous_rank], width, generator)
        S = _pad_values(warm_start.S.to(target)[:previous_rank] / scale, width, smaller, config.s_floor)
    else:
        width = min(max(max_rank or 8, min_rank) + config.oversample, smaller)
        U = _orthonormal(torch.randn(rows, width, generator=generator).to(target))
        V = _orthonormal(torch.randn(cols, width, generator=generator).to(target))
        S = (torch.randn(width, generator=generator).abs() / math.sqrt(width)).to(target)

    history: list[float] = []
    iterations = 0
    while True:
        state = _AdamatrixState(U, S, V)
        steps, check = _adamatrix_loop(target, state, phi, min_rank, max_rank, config, history, config.max_iterations - iterations)
        iterations += steps
        U, S, V, rank = check.U, check.S, check.V, check.rank

        kept_energy = float(S[:rank].to(torch.float64).square().sum())
        short = kept_energy < phi * (1.0 - _ADAMATRIX_ENERGY_SLACK) or check.too_narrow
        if not short or width >= smaller or iterations >= config.max_iterations:
            break
        width = min(2 * width, smaller)
        U = _pad_orthonormal(U, width, generator)
        V = _pad_orthonormal(V, width, generator)
        S = _pad_values(S, width, smaller, config.s_floor)

    U_kept = U[:, :rank].to(Y)
    V_kept = V[:, :rank].to(Y)
    S_kept = (S[:rank].clamp_min(0.0) * scale).to(Y)
    result = _result(U_kept, S_kept, V_kept, total, "adamatrix", iterations)
    return LowRank(
        U=result.U, S=result.S, V=result.V, rank=result.rank, energy=result.energy,
        total_energy=total, method="adamatrix", iterations=iterations, loss_history=history,
    )


class _AdamatrixState:
    """Factors of one AdaMatrix run with their Adam moments and previous updates d_prev."""

    def __init__(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        self.params = [U, S, V]
        self.first = [torch.zeros_like(p) for p in self.params]
        self.second = [torch.zeros_like(p) for p in self.params]
        self.updates = [torch.zeros_like(p) for p in self.params]


@dataclass
class _AdamatrixCheck:
    """Factors sorted by S at one step, their rank for phi and the convergence test value."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    rank: int
    measure: float
    too_narrow: bool = False


def _adamatrix_loop(
    Y: torch.Tensor,
    state: _AdamatrixState,
    phi: float,
    min_rank: int,
    max_rank: int | None,
    config: AdaMatrixConfig,
    history: list[float],
    budget: int,
) -> tuple[int, _AdamatrixCheck]:
    """Run AdaMatrix steps on `state` until a stopping rule fires; return the steps and last check."""
    rows, cols = Y.shape
    width = state.params[1].shape[0]
    lr = config.lr
    decays = 0
    window_start = 0
    check = None
    step = 0

    for step in range(1, max(budget, 1) + 1):
        params = state.params
        ahead = [p - config.mu * d for p, d in zip(params, state.updates)]
        terms = _adamatrix_terms(Y, *ahead, config)
        history.append(terms.loss)

        check = _adamatrix_check(ahead, params, terms, phi, min_rank, max_rank, config)
        if terms.loss <= config.loss_threshold or check.measure <= config.tol or step >= budget:
            break
        spare = width - check.rank
        if check.measure <= config.widen_tol and spare < config.oversample and width < min(rows, cols):
            check.too_narrow = True
            break
        if step - window_start > config.window:
            loss_before = history[-config.window - 1]
            if loss_before - terms.loss <= config.stall_tol * terms.loss:
                if decays >= config.max_decays:
                    break
                lr *= config.lr_decay
                decays += 1
                window_start = step

        _adam_step(state, ahead[1], terms, lr, step, config)

    return step, check


def _adam_step(
    state: _AdamatrixState, S_ahead: torch.Tensor, terms: _AdamatrixTerms, lr: float, step: int, config: AdaMatrixConfig
) -> None:
    """Apply one Adam update with momentum to U, S, V and re-orthonormalise U and V by QR.

    The per-column step sizes, the division of the U and V gradients by |S_l| + s_floor and the
    per-column second moment are explained in `adamatrix_svd`.
    """
    rows = state.params[0].shape[0]
    cols = state.params[2].shape[0]
    S_ahead = S_ahead.abs()
    divisor = S_ahead + config.s_floor
    grads = [terms.grad_U / divisor, terms.grad_S, terms.grad_V / divisor]

    angle = terms.column_residuals.clamp_min(0.0).sqrt() / divisor
    value_error = (S_ahead - terms.rayleigh).abs() / divisor
    rate_UV = (config.error_scale * angle).clamp_max(lr)
    rate_S = (config.error_scale * value_error).clamp_max(lr)
    # Per-entry scales: a unit column of U or V turns by about rate radians, S_l changes by
    # about rate * S_l.
    step_sizes = [rate_UV / math.sqrt(rows), rate_S * S_ahead, rate_UV / math.sqrt(cols)]

    params = state.params
    for index, grad in enumerate(grads):
        squared = grad.square()
        if index != 1:
            squared = squared.mean(0, keepdim=True).expand_as(grad)
        state.first[index] = config.beta1 * state.first[index] + (1 - config.beta1) * grad
        state.second[index] = config.beta2 * state.second[index] + (1 - config.beta2) * squared
        m_hat = state.first[index] / (1 - config.beta1**step)
        v_hat = state.second[index] / (1 - config.beta2**step)
        adam = step_sizes[index] * m_hat / (v_hat.sqrt() + config.eps)
        state.updates[index] = adam + config.mu * state.updates[index]
        params[index] = params[index] - state.updates[index]

    state.params = [_orthonormal(params[0]), params[1].clamp_min(1e-12), _orthonormal(params[2])]


@dataclass
class _AdamatrixTerms:
    """Loss, gradients, Y V, Y^T U and per-column singular-triplet residuals at one point."""

    loss: float
    grad_U: torch.Tensor
    grad_S: torch.Tensor
    grad_V: torch.Tensor
    YV: torch.Tensor
    YtU: torch.Tensor
    rayleigh: torch.Tensor
    column_residuals: torch.Tensor


def _adamatrix_terms(
    Y: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, config: AdaMatrixConfig, Y_energy: float = 1.0
) -> _AdamatrixTerms:
    """Evaluate the loss and gradients of `adamatrix_svd` with three m x n by n x k products.

    R V = U S (V^T V) - Y V and R^T U = V S (U^T U) - Y^T U avoid forming R = U S V^T - Y, and
    ||R||_F^2 = ||Y||_F^2 - 2 sum_l S_l (U^T Y V)_ll + S^T ((U^T U) (.) (V^T V)) S, where
    Y_energy is ||Y||_F^2 (1 for the scaled Y of the iteration).
    """
    YV = Y @ V
    YtU = Y.T @ U
    gram_U = U.T @ U
    gram_V = V.T @ V
    rayleigh = (U * YV).sum(0)

    residual_V = (U * S) @ gram_V - YV
    residual_tU = (V * S) @ gram_U - YtU
    projected = U * S - YV
    energy = S.square()
    weights = config.energy_weight * energy / energy.sum().clamp_min(1e-30)
    weighted = projected * weights

    S64 = S.to(torch.float64)
    plain = (
        Y_energy
        - 2.0 * float((S64 * rayleigh.to(torch.float64)).sum())
        + float(S64 @ (gram_U.to(torch.float64) * gram_V.to(torch.float64)) @ S64)
    )
    loss = max(plain, 0.0) + float((projected.square() * weights).sum()) + config.lambda1 * float(S.abs().sum())

    grad_U = 2 * (residual_V + weighted) * S
    grad_S = 2 * (U * residual_V).sum(0) + 2 * (U * weighted).sum(0) + config.lambda1 * torch.sign(S)
    grad_V = 2 * residual_tU * S - 2 * Y.T @ weighted
    column_residuals = projected.square().sum(0) + (YtU - V * S).square().sum(0)
    return _AdamatrixTerms(loss, grad_U, grad_S, grad_V, YV, YtU, rayleigh, column_residuals)


def _adamatrix_check(
    ahead: list[torch.Tensor],
    params: list[torch.Tensor],
    terms: _AdamatrixTerms,
    phi: float,
    min_rank: int,
    max_rank: int | None,
    config: AdaMatrixConfig,
) -> _AdamatrixCheck:
    """Pick the rank and evaluate the convergence test at the look-ahead point (see `adamatrix_svd`)."""
    if config.rayleigh_ritz:
        return _rayleigh_ritz_check(ahead, terms, phi, min_rank, max_rank)

    U, S, V = params
    order = torch.argsort(S, descending=True)
    S_sorted = S[order].clamp_min(0.0)
    rank = select_rank(S_sorted, phi, min_rank, max_rank, total_energy=1.0 - _ADAMATRIX_ENERGY_SLACK)
    leading = order[:rank]
    S_r = S[leading].to(torch.float64)
    captured = float((2.0 * S_r * terms.rayleigh[leading].to(torch.float64) - S_r.square()).sum())
    error = max(1.0 - captured, _ADAMATRIX_ENERGY_SLACK)
    measure = float(terms.column_residuals[leading].sum()) / error
    return _AdamatrixCheck(U[:, order], S_sorted, V[:, order], rank, measure)


def _rayleigh_ritz_check(
    ahead: list[torch.Tensor], terms: _AdamatrixTerms, phi: float, min_rank: int, max_rank: int | None
) -> _AdamatrixCheck:
    """Rayleigh-Ritz on span(U), span(V) at the look-ahead point, with the Ritz-pair residuals.

    With U = Q_U R_U and V = Q_V R_V, Y Q_V = (Y V) R_V^-1 and Y^T Q_U = (Y^T U) R_U^-1 reuse the
    gradient's products. The SVD M = Q_U^T Y Q_V = P diag(sigma) Q^T gives the Ritz triplets
    (Q_U P, sigma, Q_V Q), and their residuals are the parts of Y Q_V Q and Y^T Q_U P outside
    span(Q_U) and span(Q_V).
    """
    Q_U, R_U = torch.linalg.qr(ahead[0])
    Q_V, R_V = torch.linalg.qr(ahead[2])
    YQ_V = torch.linalg.solve_triangular(R_V, terms.YV, upper=True, left=False)
    YtQ_U = torch.linalg.solve_triangular(R_U, terms.YtU, upper=True, left=False)
    M = Q_U.T @ YQ_V
    P, sigma, Qh = torch.linalg.svd(M)
    rank = select_rank(sigma, phi, min_rank, max_rank, total_energy=1.0 - _ADAMATRIX_ENERGY_SLACK)

    left = (YQ_V - Q_U @ M) @ Qh[:rank].T
    right = (YtQ_U - Q_V @ M.T) @ P[:, :rank]
    residual = float(left.square().sum() + right.square().sum())
    error = max(1.0 - float(sigma[:rank].to(torch.float64).square().sum()), _ADAMATRIX_ENERGY_SLACK)
    return _AdamatrixCheck(Q_U @ P, sigma, Q_V @ Qh.T, rank, residual / error)


# Helpers -----------------------------------------------------------------------------------------


def _check_phi(phi: float) -> None:
    if not isinstance(phi, (int, float)) or math.isnan(phi) or not 0.0 < phi <= 1.0:
        raise ValueError(f"phi must be in (0, 1] (the fraction of energy to keep, e.g. 0.9), got {phi!r}")


def _result(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, total: float, method: str, iterations: int) -> LowRank:
    kept = float(S.to(torch.float64).square().sum())
    energy = 1.0 if total == 0.0 else min(kept / total, 1.0)
    return LowRank(
        U=U.contiguous(), S=S.contiguous(), V=V.contiguous(), rank=int(S.shape[0]), energy=energy,
        total_energy=total, method=method, iterations=iterations,
    )


def _zero_result(Y: torch.Tensor, phi: float, min_rank: int, max_rank: int | None, method: str) -> LowRank:
    """Return the factors of an all-zero Y: S = 0 and the leading columns of the identity."""
    rows, cols = Y.shape
    rank = select_rank(torch.zeros(min(rows, cols), dtype=Y.dtype), phi, min_rank, max_rank)
    U = torch.eye(rows, rank, dtype=Y.dtype, device=Y.device)
    V = torch.eye(cols, rank, dtype=Y.dtype, device=Y.device)
    return _result(U, torch.zeros(rank, dtype=Y.dtype, device=Y.device), V, 0.0, method, 0)


def _relative_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    size = min(current.numel(), previous.numel())
    if size == 0:
        return 0.0
    difference = torch.linalg.vector_norm(current[:size] - previous[:size])
    return float(difference / torch.linalg.vector_norm(current[:size]).clamp_min(1e-30))


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """Return Q of matrix = QR with the signs fixed so that diag(R) >= 0."""
    Q, R = torch.linalg.qr(matrix)
    signs = torch.sign(torch.diagonal(R))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs


def _pad_values(S: torch.Tensor, width: int, smaller: int, floor: float) -> torch.Tensor:
    """Extend S (for unit ||Y||_F) to `width` values with the RMS of the energy it does not hold.

    The new columns are random directions, so their singular values are unknown. Starting them at
    the RMS of the remaining singular values keeps them positive (relative steps cannot move a
    value away from 0) without dominating the loss.
    """
    rest = max(1.0 - float(S.to(torch.float64).square().sum()), 0.0)
    value = max(math.sqrt(rest / max(smaller - S.shape[0], 1)), floor)
    padding = torch.full((width - S.shape[0],), value, dtype=S.dtype, device=S.device)
    return torch.cat([S.clamp_min(floor), padding])


def _pad_orthonormal(basis: torch.Tensor, width: int, generator: torch.Generator) -> torch.Tensor:
    extra = width - basis.shape[1]
    if extra <= 0:
        return _orthonormal(basis[:, :width])
    padding = torch.randn(basis.shape[0], extra, generator=generator, dtype=basis.dtype).to(basis.device)
    return _orthonormal(torch.cat([basis, padding], dim=1))
