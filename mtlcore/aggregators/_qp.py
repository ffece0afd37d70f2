"""Small K×K problems on the Gramian shared by several methods (float64 CPU tensors).

Both quadratic programs below are rewritten as non-negative least squares (scipy's exact
Lawson–Hanson active-set solver), using a factor R with RᵀR = G so that ‖Rv‖² = ‖Jᵀv‖².
"""
from __future__ import annotations

import torch
from scipy.optimize import nnls
from torch import Tensor

from mtlcore.aggregators.base import logger, normalize_gramian, uniform_weights

# Eigenvalues of trace-normalised G below this count as zero (float32 rounding of J leaves
# ~1e-14 where the true Gramian is singular).
RANK_RTOL = 1e-10


class SolverError(RuntimeError):
    """A K×K solver did not converge; callers fall back and log a warning."""


def symmetric_eigen(C: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric C, from its upper triangle."""
    return torch.linalg.eigh(C, UPLO="U")


def unit_gramian(G: Tensor) -> tuple[Tensor, Tensor]:
    """C = D^-½ G D^-½ (D = diag G), the Gramian of the unit gradients, whose eigenvalues judge directions,
    not norms, and the norms √diag G. A zero gradient keeps a zero row and column in C."""
    norms = G.diagonal().clamp(min=0.0).sqrt()
    inverse = 1.0 / torch.where(norms > 0, norms, 1.0)
    return G * inverse[:, None] * inverse, norms


def unit_factor(G: Tensor) -> tuple[Tensor, Tensor]:
    """R_C (K×K) with R_CᵀR_C = C, the unit gradients' Gramian (`unit_gramian`), and the norms √diag G;
    rounding's tiny negative eigenvalues are clipped to 0. (The solver reads one triangle, so rounding's
    asymmetry of G does not matter.)"""
    C, norms = unit_gramian(G)
    eigenvalues, eigenvectors = symmetric_eigen(C)
    return eigenvalues.clamp(min=0.0).sqrt()[:, None] * eigenvectors.T, norms


def psd_factor(G: Tensor) -> Tensor:
    """R (K×K) with RᵀR = G, factorised as R_C·D^½ (`unit_factor`): for gradients whose norms differ by 1e6,
    eigh on G itself resolved the small ones' directions only to ~1e-4."""
    factor, norms = unit_factor(G)
    return factor * norms


def _nnls(A: Tensor, b: Tensor) -> Tensor:
    try:
        solution, _ = nnls(A.numpy(), b.numpy(), maxiter=50 * A.shape[1])
    except RuntimeError as error:  # "too many iterations"
        raise SolverError(str(error)) from error
    solution = torch.from_numpy(solution)
    if not torch.isfinite(solution).all():
        raise SolverError("non-finite NNLS solution")
    return solution


def min_norm_in_hull(G: Tensor) -> Tensor:
    """MGDA: α* = argmin_{α ∈ simplex} αᵀGα (the min-norm point of the convex hull of the gᵢ).

    Two tasks: Sener & Koltun's closed form. K > 2: exact, via NNLS on u ≥ 0 of
    ‖Ru‖² + (Σu − 1)²; writing u = tα (α in the simplex) the optimum over t is 1/(1+q) with
    q = αᵀGα, so u/Σu is the minimiser α*. Any weight λ > 0 on the constraint's row gives the same α*. The
    NNLS runs in β = u·‖g‖ (u_i = β_i c_i, c = 1/‖g‖), with the matrix [R_C; λcᵀ], R_C the unit gradients'
    factor and λ = 1/‖c‖, so that every entry is O(1): for norms spread over 1e-3 to 1e3 that took the KKT
    residual from 1e-4 to 2e-9 of αᵀGα (same problem, better conditioned variables).
    """
    num_tasks = len(G)
    G, scale = normalize_gramian(G)
    if scale <= 0:  # all gradients zero: every α is optimal
        return uniform_weights(num_tasks)
    if num_tasks == 1:
        return torch.ones(1, dtype=torch.float64)
    if num_tasks == 2:
        denominator = G[0, 0] + G[1, 1] - 2 * G[0, 1]
        if denominator <= 0:
            return uniform_weights(2)
        # each weight from its own numerator: 1 − γ would lose a small weight's digits to cancellation
        return (torch.stack([G[1, 1] - G[0, 1], G[0, 0] - G[0, 1]]) / denominator).clamp(0.0, 1.0)
    factor, norms = unit_factor(G)
    inverse_norms = torch.where(norms > 0, 1.0 / norms, 0.0)  # a zero gradient: u_i = 0
    weight = 1.0 / inverse_norms.norm()
    A = torch.cat([factor, (weight * inverse_norms)[None]])
    b = torch.zeros(num_tasks + 1, dtype=torch.float64)
    b[-1] = weight
    u = _nnls(A, b) * inverse_norms
    if u.sum() <= 0:
        raise SolverError("min-norm NNLS returned u = 0")
    return u / u.sum()


def project_weights_to_dual_cone(u: Tensor, G: Tensor, R: Tensor | None = None) -> Tensor:
    """Weights v with Jᵀv the projection of Jᵀu onto the dual cone {x : Jx ≥ 0}.

    The projection's dual is v = argmin_{v ≥ u} vᵀGv (TorchJD's derivation); with v = u + μ it is
    the NNLS min_{μ ≥ 0} ‖Rμ + Ru‖². R: G's `psd_factor`, when the caller already has it.
    """
    R = psd_factor(G) if R is None else R
    return u + _nnls(R, -R @ u)


def solve_or_uniform(method: str, solve, num_tasks: int) -> Tensor:
    """Run `solve()`; on SolverError log a warning and use the uniform mean weights instead."""
    try:
        return solve()
    except (SolverError, torch.linalg.LinAlgError) as error:
        logger.warning("%s: solver failed (%s); using uniform weights 1/K for this step", method, error)
        return uniform_weights(num_tasks)
