"""Rank selection by energy and truncated SVD of a 2-D tensor by five methods.

For Y (m x n) with singular values sigma_1 >= ... >= sigma_p, p = min(m, n), the kept rank r is
the smallest r with

    sigma_1^2 + ... + sigma_r^2 >= phi * (sigma_1^2 + ... + sigma_p^2),   0 < phi <= 1,

and the truncation Y_r = U_r diag(S_r) V_r^T has the exact Frobenius error
||Y - Y_r||_F = sqrt(sigma_{r+1}^2 + ... + sigma_p^2) (Eckart-Young). The total energy is
sum sigma^2 = ||Y||_F^2, so methods that compute only the leading singular values still know it.

Methods:
- ``exact``: thin LAPACK SVD (torch.linalg.svd).
- ``gram``: eigendecomposition of the smaller Gram matrix (Y^T Y or Y Y^T); fastest when
  min(m, n) is small, loses accuracy only in directions far below the kept energy.
- ``randomized``: Halko-Martinsson-Tropp range finder with oversampling and power iterations; the
  sketch width grows until the kept energy reaches phi.
- ``subspace``: block power iteration warm-started from a previous result's V, with a
  Rayleigh-Ritz step; falls back to ``randomized`` without a warm start.
- ``adamatrix``: gradient iteration on U, S, V with Adam moments, Nesterov look-ahead, a momentum
  term, energy weights, an L1 penalty on S and QR re-orthonormalisation (see `adamatrix`).
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
    """Settings of the AdaMatrix iteration.

    lr is the Adam step size eta for Y scaled to unit Frobenius norm (the paper's 1e-4 is for
    unscaled tokens and needs tens of thousands of steps); mu the Nesterov and momentum
    coefficient; lambda1 the L1 weight on S; tol the relative loss decrease over `window` steps below
    which the iteration stops; loss_threshold the relative loss L / ||Y||_F^2 at which it stops.
    """

    lr: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    mu: float = 0.3
    lambda1: float = 1e-3
    energy_weight: float = 1.0
    max_iterations: int = 2000
    tol: float = 1e-4
    window: int = 20
    loss_threshold: float = 0.0
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

    singular_values: (p,) non-increasing, non-negative. total_energy defaults to sum(sigma^2);
    pass ||Y||_F^2 when only the leading values are known. An all-zero spectrum has no energy to
    keep, so the result is min_rank (the factors are then zero). Raises ValueError for phi outside
    (0, 1], for NaN or Inf values, and for min_rank < 1 or max_rank < min_rank.
    """
    _check_phi(phi)
    if min_rank < 1:
        raise ValueError(f"min_rank must be >= 1, got {min_rank}")
    if max_rank is not None and max_rank < min_rank:
        raise ValueError(f"max_rank {max_rank} is smaller than min_rank {min_rank}")

    values = singular_values.detach().to(torch.float64).flatten()
    if not torch.isfinite(values).all():
        raise ValueError("singular values contain NaN or Inf: check the input tokens for non-finite values")
    available = values.numel()
    upper = available if max_rank is None else min(max_rank, available)

    energies = values.square()
    cumulative = torch.cumsum(energies, dim=0)
    total = float(cumulative[-1]) if total_energy is None else float(total_energy)
    if available == 0 or total <= 0.0:
        return max(1, min(min_rank, max(available, 1)))

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
    ``adamatrix`` and ``auto``). Raises ValueError for a non-2-D or non-finite Y, an unknown
    method or phi outside (0, 1].
    """
    _check_phi(phi)
    if Y.ndim != 2:
        raise ValueError(f"Y must be a 2-D matrix, got shape {tuple(Y.shape)}")
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

    if tall:
        V = kept
        U = (Y @ V) / safe
    else:
        U = kept
        V = (Y.T @ U) / safe
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
) -> LowRank:
    """Block power iteration on Y from a start basis V0 (n x r0), with a Rayleigh-Ritz step.

    Each step maps the right basis through Y and Y^T and re-orthonormalises it; the Rayleigh-Ritz
    step takes the SVD of the small k x k matrix Q_U^T Y Q_V. The iteration stops when the leading
    r Ritz values change by less than `tol` (relative) and hold phi of ||Y||_F^2. V0 None starts
    from a random basis (a cold start, for comparison).
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
    while True:
        basis_left, _ = torch.linalg.qr(Y @ basis_right)
        basis_right, _ = torch.linalg.qr(Y.T @ basis_left)
        iterations += 1

        Ub, S, Vh = torch.linalg.svd(basis_left.T @ Y @ basis_right, full_matrices=False)
        rank = select_rank(S, phi, min_rank, max_rank, total_energy=total)
        kept = float(S[:rank].to(torch.float64).square().sum())
        reached = total == 0.0 or kept >= phi * total * (1.0 - 1e-9)

        if reached and rank >= width - 1 and width < smaller:
            width = min(width + max(oversample, rank // 2), smaller)
            padding = torch.randn(cols, width - basis_right.shape[1], generator=generator, dtype=Y.dtype)
            basis_right, _ = torch.linalg.qr(torch.cat([basis_right, padding.to(Y.device)], dim=1))
            previous = None
            continue
        if not reached and width < smaller:
            width = min(2 * width, smaller)
            padding = torch.randn(cols, width - basis_right.shape[1], generator=generator, dtype=Y.dtype)
            basis_right, _ = torch.linalg.qr(torch.cat([basis_right, padding.to(Y.device)], dim=1))
            previous = None
            continue

        converged = previous is not None and _relative_change(S[:rank], previous[:rank]) < tol
        if converged or iterations >= max_iterations:
            U = basis_left @ Ub[:, :rank]
            V = basis_right @ Vh[:rank].T
            return _result(U, S[:rank], V, total, "subspace", iterations)
        previous = S


# AdaMatrix ----------------------------------------------------------------------------------------


def adamatrix_svd(
    Y: torch.Tensor,
    phi: float,
    warm_start: LowRank | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    config: AdaMatrixConfig | None = None,
) -> LowRank:
    """Solve the truncated SVD by the AdaMatrix gradient iteration (SDRM, Du et al. 2025).

    Y is scaled to unit Frobenius norm (the result is scaled back). With k = r + oversample columns,
    U (m x k) and V (n x k) orthonormal and S (k,), the minimised loss is

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
    updates Adam moments with bias correction by the step count k, takes
    d = lr * m_hat / (sqrt(v_hat) + eps) + mu * d_prev, subtracts d, and re-orthonormalises U and V
    by QR with the signs fixed by diag(R). The iteration stops when L / ||Y||_F^2 falls to
    `loss_threshold`, when it decreases by less than `tol` (relative) in one step, or at
    `max_iterations`. The rank is then chosen from the converged S; when S cannot reach phi with
    k columns, k doubles and the iteration continues from the current factors.
    """
    config = config or AdaMatrixConfig()
    rows, cols = Y.shape
    smaller = min(rows, cols)
    total = float(Y.to(torch.float64).square().sum())
    if total == 0.0:
        return _exact(Y, phi, min_rank, max_rank)

    scale = math.sqrt(total)
    target = (Y / scale).to(torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    if warm_start is not None and warm_start.U.shape[0] == rows:
        width = min(warm_start.rank + config.oversample, smaller)
        U = _pad_orthonormal(warm_start.U.to(torch.float32), width, generator)
        V = _pad_orthonormal(warm_start.V.to(torch.float32), width, generator)
        S = torch.zeros(width)
        S[: warm_start.rank] = warm_start.S.to(torch.float32)[:width] / scale
    else:
        width = min((max_rank or 8) + config.oversample, smaller)
        U = _orthonormal(torch.randn(rows, width, generator=generator))
        V = _orthonormal(torch.randn(cols, width, generator=generator))
        S = torch.randn(width, generator=generator).abs()

    history: list[float] = []
    iterations = 0
    while True:
        U, S, V, steps = _adamatrix_loop(target, U, S, V, config, history)
        iterations += steps
        S, U = _sort_components(S, U)
        order = torch.argsort(S, descending=True)
        S, U, V = S[order], U[:, order], V[:, order]

        rank = select_rank(S.clamp_min(0.0), phi, min_rank, max_rank, total_energy=1.0)
        kept = float(S[:rank].to(torch.float64).clamp_min(0.0).square().sum())
        if kept >= phi * (1.0 - 1e-3) or width >= smaller or iterations >= config.max_iterations * 4:
            break
        width = min(2 * width, smaller)
        U = _pad_orthonormal(U, width, generator)
        V = _pad_orthonormal(V, width, generator)
        S = torch.cat([S, torch.zeros(width - S.shape[0])])

    S_kept = S[:rank].clamp_min(0.0) * scale
    result = _result(U[:, :rank].to(Y.dtype), S_kept.to(Y.dtype), V[:, :rank].to(Y.dtype), total, "adamatrix", iterations)
    return LowRank(
        U=result.U, S=result.S, V=result.V, rank=result.rank, energy=result.energy,
        total_energy=total, method="adamatrix", iterations=iterations, loss_history=history,
    )


def _adamatrix_loop(
    Y: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    config: AdaMatrixConfig,
    history: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    params = [U, S, V]
    first = [torch.zeros_like(p) for p in params]
    second = [torch.zeros_like(p) for p in params]
    updates = [torch.zeros_like(p) for p in params]
    previous_loss = math.inf
    # Adam moves every entry by about lr per step, so U and V steps are divided by the square root
    # of their row count: a column of unit norm then moves by about lr, like the scaled S.
    step_scales = [1.0 / math.sqrt(U.shape[0]), 1.0, 1.0 / math.sqrt(V.shape[0])]
    decay = 1.0

    for step in range(1, config.max_iterations + 1):
        ahead = [p - config.mu * d for p, d in zip(params, updates)]
        loss, grads = _adamatrix_gradients(Y, *ahead, config)
        history.append(loss)
        # Adam with a constant step oscillates around the minimum; halving the step whenever the
        # loss rises lets the iteration settle instead.
        if loss > previous_loss:
            decay *= 0.5

        for index, grad in enumerate(grads):
            step_size = config.lr * decay * step_scales[index]
            first[index] = config.beta1 * first[index] + (1 - config.beta1) * grad
            second[index] = config.beta2 * second[index] + (1 - config.beta2) * grad.square()
            m_hat = first[index] / (1 - config.beta1**step)
            v_hat = second[index] / (1 - config.beta2**step)
            updates[index] = step_size * m_hat / (v_hat.sqrt() + config.eps) + config.mu * updates[index]
            params[index] = params[index] - updates[index]

        params[0] = _orthonormal(params[0])
        params[2] = _orthonormal(params[2])

        if loss <= config.loss_threshold:
            break
        window = config.window
        if step > window and history[-window - 1] - loss <= config.tol * max(loss, 1e-12):
            break
        previous_loss = loss

    return params[0], params[1], params[2], step


def _adamatrix_gradients(
    Y: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, config: AdaMatrixConfig
) -> tuple[float, list[torch.Tensor]]:
    """Return the loss and its gradients with respect to U, S and V (see `adamatrix_svd`)."""
    US = U * S
    residual = US @ V.T - Y
    projected = US - Y @ V

    energy = S.square()
    weights = config.energy_weight * energy / energy.sum().clamp_min(1e-30)
    weighted = projected * weights

    loss = (
        float(residual.square().sum())
        + float((projected.square() * weights).sum())
        + config.lambda1 * float(S.abs().sum())
    )
    residual_V = residual @ V
    grad_U = 2 * residual_V * S + 2 * weighted * S
    grad_S = 2 * (U * residual_V).sum(0) + 2 * (U * weighted).sum(0) + config.lambda1 * torch.sign(S)
    grad_V = 2 * (residual.T @ U) * S - 2 * Y.T @ weighted
    return loss, [grad_U, grad_S, grad_V]


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


def _pad_orthonormal(basis: torch.Tensor, width: int, generator: torch.Generator) -> torch.Tensor:
    extra = width - basis.shape[1]
    if extra <= 0:
        return _orthonormal(basis[:, :width])
    padding = torch.randn(basis.shape[0], extra, generator=generator, dtype=basis.dtype)
    return _orthonormal(torch.cat([basis, padding], dim=1))


def _sort_components(S: torch.Tensor, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make S non-negative by flipping the matching columns of U."""
    signs = torch.where(S < 0, -torch.ones_like(S), torch.ones_like(S))
    return S * signs, U * signs
