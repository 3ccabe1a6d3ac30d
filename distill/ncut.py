"""Normalized cut on patch graphs, in torch, batched over images: the solver of TokenCut and MaskCut.

Shi & Malik (2000), "Normalized cuts and image segmentation": for a graph with symmetric,
non-negative affinities W (N x N) and degrees d_i = Σ_j W_ij, D = diag(d), the relaxed Ncut is the
generalised eigenproblem (their Eq. 7; TokenCut, Wang et al. 2022, Eq. 3)

    (D − W) x = λ D x,

and the eigenvector of the second-smallest λ bipartitions the graph. With u = D^{1/2} x it is the
symmetric problem on the normalised Laplacian

    L_sym u = λ u,    L_sym = I − D^{−1/2} W D^{−1/2},

so x = D^{−1/2} u, normalised like scipy's `eigh(D − W, D)` (xᵀ D x = 1).

`second_smallest_eigenvectors` solves it for a batch of graphs in torch (float64, on the graphs'
device) the way LAPACK does inside scipy's `eigh(D − W, D, subset_by_index=[1, 2])`: Householder
reduction of L_sym to a tridiagonal matrix, whose eigenpairs `torch.linalg.eigh` then gives, but
stopped as soon as the wanted pair has converged (usually after 10-40 of the N columns) instead of
reducing the whole matrix. The result equals scipy's to about 1e-12, including the sign of the
vector, which MaskCut's corner rule depends on; a cut is several times cheaper than scipy's
(docs/benchmarks.md).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-5  # TokenCut's weight for the edges below the threshold (`--eps`), so the graph stays connected
TOL = 1e-9  # residual |e_k s_k| (C's norm is at most 2) at which a Ritz pair counts as converged
_FIRST_CHECK = 8  # columns before the first convergence test (one small eigh per column after)


def binary_affinity(features: torch.Tensor, tau: float, eps: float = EPS) -> torch.Tensor:
    """TokenCut's graph: 1 where the cosine similarity of two patches exceeds `tau`, `eps` elsewhere.

    features: (B, N, D). Rows are L2-normalised (a zero row stays zero, so its similarities are 0),
    the similarities are computed in float32 as in the official code, and the result is float64.
    The diagonal is 1 for any non-zero feature (cos = 1 > tau), as there.
    """
    unit = F.normalize(features.float(), p=2, dim=-1)
    above = torch.bmm(unit, unit.transpose(1, 2)) > tau
    return torch.where(above, torch.ones((), dtype=torch.float64, device=above.device),
                       torch.full((), eps, dtype=torch.float64, device=above.device))


def second_smallest_eigenvectors(affinity: torch.Tensor, max_steps: int | None = None,
                                 tol: float = TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ₂ (B,), x₂ (B, N)) of (D − W) x = λ D x for each graph W of the batch (B, N, N).

    x₂ is normalised (xᵀ D x = 1) and signed as scipy's `eigh(D − W, D)` returns it (see
    `_partial_tridiagonalisation`); MaskCut's corner rule depends on that sign.
    """
    batch, n, _ = affinity.shape
    w = affinity.to(torch.float64)
    inv_sqrt = w.sum(-1).rsqrt()
    if n == 1:  # no second eigenpair: a constant vector, which cuts nothing
        return w.new_zeros(batch), inv_sqrt
    theta, u = _partial_tridiagonalisation(w, inv_sqrt, min(max_steps or n, n), tol)
    return theta, u * inv_sqrt


def _partial_tridiagonalisation(w: torch.Tensor, inv_sqrt: torch.Tensor, max_steps: int,
                                tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-smallest eigenpair of each C = L_sym = I − D^{−1/2} W D^{−1/2} (W: (B, N, N), inv_sqrt:
    D^{−1/2} as (B, N)), by LAPACK's own route, stopped early. C is applied matrix-free.

    scipy's `eigh(D − W, D, subset_by_index=[1, 2])` (LAPACK `dsygvx`) reduces C = L_sym to a
    tridiagonal T = Qᵀ C Q with Householder reflectors H(1)...H(N−1) taken column by column from the
    top-left (`dsytrd`, lower), finds T's eigenvector z by inverse iteration (`dstein`, which signs z
    so that its largest-magnitude entry is positive) and returns Q z. The first k columns of Q span the
    Krylov space of C from e₁, so the same reflectors built one column at a time, matrix-free (one
    product with C each, applied in compact WY form), give T's leading k x k block: its Ritz pair
    converges to the wanted pair within a few dozen columns. Stopped when every graph's residual
    |e_k s_k| <= `tol`, or after `max_steps` columns (N: the whole reduction, exact).
    """
    batch, n, _ = w.shape
    capacity = min(max_steps, 64)  # columns allocated; doubled when a graph needs more
    reflectors = w.new_zeros(batch, n, capacity)  # Householder vectors v_j (v_j[j + 1] = 1), as columns
    t_factor = w.new_zeros(batch, capacity, capacity)  # H(1)...H(k) = I − V T Vᵀ (dlarft, forward)
    basis = w.new_zeros(batch, capacity, n)  # q_i = Q e_i
    diagonal = w.new_zeros(batch, capacity)
    off_diagonal = w.new_zeros(batch, capacity)
    rows = torch.arange(batch, device=w.device)
    for i in range(max_steps):
        if i == capacity:
            grow = min(capacity, max_steps - capacity)
            reflectors = torch.cat([reflectors, w.new_zeros(batch, n, grow)], 2)
            t_factor = torch.nn.functional.pad(t_factor, (0, grow, 0, grow))
            basis = torch.cat([basis, w.new_zeros(batch, grow, n)], 1)
            diagonal = torch.cat([diagonal, w.new_zeros(batch, grow)], 1)
            off_diagonal = torch.cat([off_diagonal, w.new_zeros(batch, grow)], 1)
            capacity += grow
        v, t = reflectors[:, :, :i], t_factor[:, :i, :i]
        q = -torch.bmm(v, torch.bmm(t, v[:, i, :, None]))[..., 0]  # Q e_i = e_i − V T Vᵀ e_i
        q[:, i] += 1.0
        basis[:, i] = q
        column = q - inv_sqrt * torch.bmm(w, (inv_sqrt * q)[..., None])[..., 0]  # C q
        column = column - torch.bmm(v, torch.bmm(t.transpose(1, 2), torch.bmm(v.transpose(1, 2), column[..., None])))[..., 0]
        diagonal[:, i] = column[:, i]
        if i + 1 < n:  # dlarfg on column i below the diagonal: H = I − τ v vᵀ maps [α; x] to [β; 0]
            alpha, rest = column[:, i + 1], column[:, i + 2:]
            rest_norm = rest.norm(dim=-1)
            beta = -torch.where(alpha >= 0, 1.0, -1.0).to(w.dtype) * torch.hypot(alpha, rest_norm)
            nontrivial = rest_norm > 0
            beta = torch.where(nontrivial, beta, alpha)
            tau = torch.where(nontrivial, (beta - alpha) / beta, torch.zeros_like(beta))
            scale = torch.where(nontrivial, 1.0 / (alpha - beta), torch.zeros_like(beta))
            reflectors[:, i + 1, i] = 1.0
            reflectors[:, i + 2:, i] = rest * scale[:, None]
            t_factor[:, :i, i] = -tau[:, None] * torch.bmm(t, torch.bmm(v.transpose(1, 2),
                                                                        reflectors[:, :, i:i + 1]))[..., 0]
            t_factor[:, i, i] = tau
            off_diagonal[:, i] = beta
        size = i + 1
        if size < _FIRST_CHECK and size < max_steps:
            continue
        tridiagonal = (torch.diag_embed(diagonal[:, :size]) + torch.diag_embed(off_diagonal[:, : size - 1], 1)
                       + torch.diag_embed(off_diagonal[:, : size - 1], -1))
        ritz_values, ritz_vectors = torch.linalg.eigh(tridiagonal)
        residual = off_diagonal[:, i].abs() * ritz_vectors[:, -1, 1].abs()
        if size == max_steps or bool((residual <= tol).all()):
            break
    z = ritz_vectors[:, :, 1]
    peak = z[rows, z.abs().argmax(-1)]
    z = torch.where(peak[:, None] < 0, -z, z)  # dstein's sign: the largest entry of z positive
    u = torch.bmm(z[:, None, :], basis[:, :size])[:, 0]
    return ritz_values[:, 1].clone(), u / u.norm(dim=-1, keepdim=True)


def ncut_value(affinity: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Ncut(S, S̄) = cut(S, S̄)/vol(S) + cut(S, S̄)/vol(S̄) of each partition, in [0, 2] (Shi & Malik Eq. 2).

    affinity: (B, N, N); masks: (B, N) bool, S = True. A trivial partition (S or S̄ empty), or a side
    with no edges, gives 2, the worst value.
    """
    s = masks.to(affinity.dtype)
    degree = affinity.sum(-1)
    vol_s = (degree * s).sum(-1)
    vol_rest = (degree * (1 - s)).sum(-1)
    inside = torch.bmm(s[:, None, :], torch.bmm(affinity, s[..., None]))[:, 0, 0]
    cut = vol_s - inside
    value = cut / vol_s.clamp_min(1e-300) + cut / vol_rest.clamp_min(1e-300)
    return torch.where((vol_s > 0) & (vol_rest > 0), value.clamp(0, 2), torch.full_like(value, 2.0))


def cut_score(affinity: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 − Ncut/2, in [0, 1]: how cleanly each mask is cut from the rest of its graph (higher is better)."""
    return 1.0 - ncut_value(affinity, masks) / 2.0


def attended_side(vector: np.ndarray, attention: np.ndarray, grid: tuple[int, int],
                  active: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """(foreground side, seed) of one cut by CLS attention (`--foreground attention`): of the two sides
    of the split at the mean, the object is the one whose patches the CLS token attends to more on
    average (over the `active` patches: MaskCut's later cuts leave out the objects already found);
    the seed is that side's extreme patch of `vector` (its largest x above the mean, its smallest
    below), as MaskCut seeds. vector, attention, active: (N,) over the grid's patches in raster order.

    DINO's CLS attention highlights the object (Caron et al. 2021), which is what the official rules
    (the side holding the largest |x|; MaskCut adds the corner prior) stand in for; on DINOv2 those
    pick the background side of some cuts (docs/dinov2.md)."""
    above = vector > vector.mean()
    active = np.ones_like(above) if active is None else active
    inside, outside = attention[above & active], attention[~above & active]
    if outside.size and (not inside.size or outside.mean() > inside.mean()):
        return ~above.reshape(grid), divmod(int((-vector).argmax()), grid[1])
    return above.reshape(grid), divmod(int(vector.argmax()), grid[1])
