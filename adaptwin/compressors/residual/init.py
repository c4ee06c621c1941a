"""Initial shared, low-rank and diagonal parts of a group of same-shaped matrices, from the weights alone.

Minimises the total weight error E = Σ_i ‖W_i − S − L_i − D_i‖²_F over a shared S, rank-r L_i and diagonal
D_i. The naive ("mean") start takes S = mean W_i, then L_i = SVD_r(W_i − S), then D_i = diag(W_i − S − L_i).
"Alternating" continues from there with block-coordinate descent: each step is the exact minimiser of E
over one block with the others fixed (S: the mean of W_i − L_i − D_i; L_i: the truncated SVD of
W_i − S − D_i, Eckart-Young; D_i: the diagonal of W_i − S − L_i), so E never rises and the result is never
worse than the naive start. The mean is optimal for S only when the L_i are zero: with them, S should hold
what the layers share beyond their leading residual directions, and the sweeps move it there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupFactors:
    """``W_i ≈ shared + lefts[i] @ rights[i].T + diag(diags[i])`` (leading square block), float64."""

    shared: torch.Tensor  # (out, in)
    lefts: list[torch.Tensor]  # each (out, r_i): U_r Σ_r^½
    rights: list[torch.Tensor]  # each (in, r_i): V_r Σ_r^½
    diags: list[torch.Tensor] | None  # each (min(out, in),)
    error_mean: float  # relative weight error sqrt(E / Σ‖W_i‖²) of the naive start
    error: float  # ... of the returned factors
    sweeps: int  # alternating sweeps run


def _diag_matrix(d: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    out = d.new_zeros(shape)
    n = d.shape[0]
    out[:n, :n] = torch.diag(d)
    return out


def _low_rank(r: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``(U_r Σ_r^½ (out, rank), V_r Σ_r^½ (in, rank))`` of ``r``, float64.

    Through the eigendecomposition of the smaller Gram (rᵀr or r·rᵀ): 3-5x faster than an SVD of the
    (1536, 384) MiniLM FFN matrices (0.44 s each on a loaded core), and the alternating sweeps run one per
    matrix per sweep. Squaring the condition number costs nothing that matters in float64 for the leading
    directions kept; trailing directions with σ ≈ 0 get zero factors.
    """
    if rank == 0:
        return r.new_zeros(r.shape[0], 0), r.new_zeros(r.shape[1], 0)
    wide = r.shape[0] < r.shape[1]
    a = r.T if wide else r  # (m, n), n <= m
    lam, vec = torch.linalg.eigh(a.T @ a)  # ascending
    lam, v = lam[-rank:].flip(0).clamp_min(0.0), vec[:, -rank:].flip(1)  # (rank,), (n, rank)
    s = lam.sqrt()
    tiny = s[:1].clamp_min(torch.finfo(s.dtype).tiny) * 1e-12
    inv = torch.where(s > tiny, s.clamp_min(torch.finfo(s.dtype).tiny).rsqrt(), torch.zeros_like(s))
    left, right = (a @ v) * inv, v * s.sqrt()  # U_r Σ^½ = A V Σ^-½, V_r Σ^½
    return (right, left) if wide else (left, right)


def residual_factors(weights: list[torch.Tensor], ranks: list[int], *, diagonal: bool = True,
                     method: str = "alternating", iterations: int = 30, tol: float = 1e-3) -> GroupFactors:
    """Shared + per-matrix low-rank + diagonal factors of ``weights`` (each (out, in), same shape).

    Args:
        weights: the group's matrices, in layer order.
        ranks: the low-rank part's rank per matrix (0..min(out, in)).
        diagonal: fit a per-matrix diagonal.
        method: ``"alternating"`` or ``"mean"`` (the naive start, returned as is).
        iterations: most alternating sweeps; tol: stop when a sweep lowers the error by less than this
            fraction of it.

    Returns:
        `GroupFactors`, with the naive start's error and the final one. Exact (error 0 up to rounding) when
        every rank is full, or for a single matrix (S = W).
    """
    if not weights or len(ranks) != len(weights):
        raise ValueError(f"need one rank per weight, got {len(ranks)} ranks for {len(weights)} weights")
    shape = tuple(weights[0].shape)
    if any(tuple(w.shape) != shape for w in weights):
        raise ValueError(f"a group's matrices must share one shape, got {[tuple(w.shape) for w in weights]}")
    if method not in ("alternating", "mean"):
        raise ValueError(f"method must be 'alternating' or 'mean', got {method!r}")
    w = [x.detach().double() for x in weights]
    norm = sum(float(x.pow(2).sum()) for x in w) or 1.0
    n = min(shape)

    def fit_rest(shared: torch.Tensor, old_diags: list | None) -> tuple[list, list, list | None, float]:
        """L_i given S and the previous D_i, then D_i given S and L_i; returns the factors and E."""
        lefts, rights, diags, err = [], [], [] if diagonal else None, 0.0
        for x, r, d_old in zip(w, ranks, old_diags or [None] * len(w)):
            rest = x - shared
            if d_old is not None:
                rest = rest - _diag_matrix(d_old, shape)
            a, b = _low_rank(rest, r)
            lefts.append(a)
            rights.append(b)
            left_over = x - shared - a @ b.T
            if diagonal:
                d = torch.diagonal(left_over[:n, :n]).clone()
                diags.append(d)
                left_over = left_over - _diag_matrix(d, shape)
            err += float(left_over.pow(2).sum())
        return lefts, rights, diags, err

    shared = torch.stack(w).mean(0)  # (out, in)
    lefts, rights, diags, err = fit_rest(shared, None)
    error_mean = (err / norm) ** 0.5
    sweeps = 0
    if method == "alternating":
        for sweeps in range(1, iterations + 1):  # noqa: B007 - the count is reported
            own = [a @ b.T + (_diag_matrix(d, shape) if diags is not None else 0.0)
                   for a, b, d in zip(lefts, rights, diags or [None] * len(w))]
            shared = torch.stack([x - o for x, o in zip(w, own)]).mean(0)
            lefts, rights, diags, new = fit_rest(shared, diags)
            done = err - new <= tol * err
            err = new
            if done:
                break
    return GroupFactors(shared, lefts, rights, diags, error_mean, (err / norm) ** 0.5, sweeps)
