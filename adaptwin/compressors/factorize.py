"""Factorisations shared by the compressors: truncated SVD of a product, split into two factors.

The plain forms (`product_factors`, `matrix_factors`) minimise the error of the weights. The whitened
forms minimise the error of the OUTPUTS on calibration inputs X: with a Gram G = XᵀX = S·Sᵀ,
‖X(W − Ŵ)ᵀ‖ = ‖(W − Ŵ)S‖, so truncating the SVD of W·S and mapping the factors back is optimal in that
norm (SVD-LLM / ASVD style). `gram_root` and `centred_gram` turn the accumulated statistics into S.
"""

from __future__ import annotations

import zlib

import torch


def product_factors(
    lefts: list[torch.Tensor], shared: torch.Tensor, rank: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Best rank-``rank`` factorisation of the stacked products ``[L_1; L_2; ...] @ S``.

    Args:
        lefts: per-head factors, each (m, d_h).
        shared: (d_h, n), shared by every head in ``lefts`` (one KV head of grouped-query attention).
        rank: kept rank, at most d_h.

    Returns:
        per-head ``A_i`` (m, rank) and shared ``B`` (n, rank), float64, with ``L_i @ S ≈ A_i @ B.T``;
        ``A = U_r Σ_r^½`` and ``B = V_r Σ_r^½`` of the stacked product, so the error is the optimal one.
        Computed through QR of both sides and an SVD of the d_h×d_h core, never forming m×n.
    """
    stacked = torch.cat([x.double() for x in lefts], dim=0)  # (G·m, d_h)
    q_l, r_l = torch.linalg.qr(stacked)  # (G·m, d_h), (d_h, d_h)
    q_s, r_s = torch.linalg.qr(shared.double().T)  # (n, d_h), (d_h, d_h)
    u, s, vh = torch.linalg.svd(r_l @ r_s.T)
    root = s[:rank].sqrt()
    a = (q_l @ u[:, :rank]) * root  # (G·m, rank)
    b = (q_s @ vh[:rank].T) * root  # (n, rank)
    return list(a.split([x.shape[0] for x in lefts], dim=0)), b


def matrix_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of ``weight`` (out, in) as ``(U_r Σ_r^½ (out, rank), V_r Σ_r^½ (in, rank))``, float64."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


def lora_init(like: torch.Tensor, cols: int, seed: int, name: str) -> torch.Tensor:
    """Random LoRA columns (rows(like), cols) with the spectral factor's RMS, reproducible per module.

    The partner factor starts at zero, so the compressed layer starts exactly at the SVD approximation.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    # Match the spectral factor's scale; with no spectral part (LoRA from scratch) use 1/sqrt(fan-in).
    rms = like.pow(2).mean().sqrt().item() if like.numel() else like.shape[0] ** -0.5
    noise = torch.randn(like.shape[0], cols, generator=gen, dtype=torch.float64)  # CPU: same draw on any device
    return noise.to(like.device) * (rms or 1.0)


def centred_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-removed second moment of the inputs behind a homogeneous Gram.

    Args:
        gram: (d+1, d+1) float64, Σ x̃x̃ᵀ over N tokens with x̃ = [x, 1] (so ``gram[-1, -1]`` is N).

    Returns:
        ``(C (d, d), μ (d,))``: C = Σ (x − μ)(x − μ)ᵀ / N and the mean μ, float64. Used where an error
        along the mean costs nothing: a free bias absorbs it, or softmax ignores it (key side).
    """
    g = gram.double()
    n = g[-1, -1].clamp_min(1.0)
    mean = g[:-1, -1] / n
    return g[:-1, :-1] / n - torch.outer(mean, mean), mean


def gram_root(gram: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """A square root S (k, k) of ``gram`` + ridge, float64, with S·Sᵀ = G + ε·I, ε = ridge·trace(G)/k.

    Through the eigendecomposition, so a singular G (inputs of a LayerNorm lie on a hyperplane, too few
    tokens) or one with rounding-negative eigenvalues still works: those are clamped to 0 before the
    ridge. The ridge keeps S invertible, which makes the whitened factors exact at full rank; at 1e-6
    of the mean eigenvalue it leaves the weighting of every direction the data visits unchanged.
    """
    g = gram.double()
    g = (g + g.T) / 2
    eps = ridge * g.diagonal().sum().clamp_min(0.0) / g.shape[0]
    if not eps > 0:  # all-zero inputs: no direction is preferred, plain weight error
        eps = torch.ones((), dtype=torch.float64)
    lam, vec = torch.linalg.eigh(g)
    return vec * (lam.clamp_min(0.0) + eps).sqrt()  # (k, k): vec·diag(λ+ε)·vecᵀ = (vec√·)(vec√·)ᵀ


def _inv_sqrt(s: torch.Tensor) -> torch.Tensor:
    # Directions with σ = 0 (a rank-deficient weight) contribute nothing: give them zero factors.
    tiny = s[:1].clamp_min(torch.finfo(s.dtype).tiny) * 1e-13
    return torch.where(s > tiny, s.clamp_min(torch.finfo(s.dtype).tiny).rsqrt(), torch.zeros_like(s))


def balance(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale column pairs (a_j·c, b_j/c) to equal norms; the product a·bᵀ is unchanged.

    Whitened factors are balanced in the whitened space, not the raw one: an input side whose
    activations are 10x larger than the output side's would get factors 10x apart, and Adam, which
    steps every entry by about lr, would then move one side too fast and the other too slowly.
    Plain SVD factors (U√Σ, V√Σ) already have ‖a_j‖ = ‖b_j‖; this restores that.
    """
    na, nb = a.norm(dim=0), b.norm(dim=0)
    c = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
    return a * c, b / c


def whitened_product_factors(
    lefts: list[torch.Tensor], shared: torch.Tensor, rank: int,
    left_root: torch.Tensor | None = None, right_root: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Rank-``rank`` factors of the stacked products ``L_i @ S`` that are optimal for the whitened error.

    Minimises Σ_i ‖R_lᵀ (L_i S − A_i Bᵀ) R_r‖ (R_l R_lᵀ = G_left, R_r R_rᵀ = G_right), i.e. the error
    of x_l·(L_i S)·x_rᵀ summed over calibration inputs on both sides (QK twin: query and key
    inputs), or of (L_i S)·x_rᵀ when ``left_root`` is None (VO twin: value inputs only).

    Args:
        lefts: per-head factors, each (m, d_h); shared: (d_h, n), as in `product_factors`.
        rank: kept rank, at most d_h.
        left_root: (m, m) root of the left Gram, or None (identity: plain error on that side).
        right_root: (n, n) root of the right Gram, or None.

    Returns:
        per-head ``A_i`` (m, rank) and shared ``B`` (n, rank), float64, with ``L_i @ S ≈ A_i @ B.T``.
        Exact at full rank when the roots are invertible. Only d_h-sized cores are decomposed: with the
        whitened product W = U Σ Vᵀ, the raw factors R_l⁻ᵀUΣ½ = L·(S R_r V)Σ^-½ and R_r⁻ᵀVΣ½ =
        Sᵀ·(Σ_i L_iᵀ R_l U_i)Σ^-½ need no inverse of a root, so an ill-conditioned Gram cannot blow up.
    """
    stacked = torch.cat([x.double() for x in lefts], dim=0)  # (G·m, d_h)
    white_l = stacked if left_root is None else torch.cat(
        [left_root.double().T @ x.double() for x in lefts], dim=0)  # (G·m, d_h)
    white_s = shared.double() if right_root is None else shared.double() @ right_root.double()  # (d_h, n)
    _, r_l = torch.linalg.qr(white_l)  # (d_h, d_h): white_l = Q_l R_l
    _, r_s = torch.linalg.qr(white_s.T)  # (d_h, d_h): white_sᵀ = Q_s R_s
    u, s, vh = torch.linalg.svd(r_l @ r_s.T)  # core of white_l @ white_s = Q_l (R_l R_sᵀ) Q_sᵀ
    scale = _inv_sqrt(s[:rank])
    # white_s·V = R_sᵀ·vh_rᵀ and white_lᵀ·U = R_lᵀ·u_r: the Q factors cancel.
    a = stacked @ (r_s.T @ vh[:rank].T) * scale  # (G·m, rank)
    b = shared.double().T @ (r_l.T @ u[:, :rank]) * scale  # (n, rank)
    a, b = balance(a, b)
    return list(a.split([x.shape[0] for x in lefts], dim=0)), b


def whitened_matrix_factors(weight: torch.Tensor, rank: int, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of ``weight`` (out, in) minimising ‖(W − Ŵ)·R‖, R Rᵀ = G of the inputs.

    Returns ``(out (out, rank), in (in, rank))``, float64, with Ŵ = out·inᵀ = U_r U_rᵀ W: the rows of W
    projected on the top left singular vectors of W·R (the output directions the inputs excite most).
    Exact at full rank when R is invertible.
    """
    w = weight.double()
    u, s, _ = torch.linalg.svd(w @ root.double(), full_matrices=False)  # (out, k), (k,)
    scale = _inv_sqrt(s[:rank])
    out = u[:, :rank] * (s[:rank] * scale)  # U_r Σ½ (0 where σ = 0)
    inp = w.T @ u[:, :rank] * scale  # (in, rank): R⁻ᵀ V_r Σ½ = Wᵀ U_r Σ^-½
    return balance(out, inp)


def inner_whitened_factors(
    lefts: list[torch.Tensor], shared: torch.Tensor, rank: int, inner_root: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Rank-``rank`` factors of ``L_i @ S`` weighted by the second moment of what ``S`` feeds the ``L_i``.

    For the VO twin, out = Σ_i c_i·L_iᵀ with c_i = A_i·X·Sᵀ the attention-mixed values of head i: the
    weighting must be that of c (the output projection's input, observed), not of the unmixed X -
    attention concentrates on a few tokens, whose values are far from typical. With approximations
    A_i·βᵀ·S (every rank-r VO factorisation has this form, see `whitened_product_factors`), the error
    is Σ_i ‖(L_i − A_i βᵀ)·R‖ for R Rᵀ = Gram(c).

    Args:
        lefts: per-head factors (m, d_h); shared: (d_h, n); inner_root: (d_h, d_h) root of the Gram of
            the d_h-wide signal between them (summed over the heads that share ``shared``).

    Returns:
        ``A_i`` (m, rank) and ``B = Sᵀβ`` (n, rank), float64, with ``L_i @ S ≈ A_i @ B.T``; exact at
        full rank when R is invertible.
    """
    eye = torch.eye(shared.shape[0], dtype=torch.float64, device=shared.device)
    a, beta = whitened_product_factors(lefts, eye, rank, None, inner_root)  # L_i ≈ A_i βᵀ, (d_h, rank)
    sizes = [x.shape[0] for x in lefts]
    a_all, b = balance(torch.cat(a, 0), shared.double().T @ beta)  # (n, rank)
    return list(a_all.split(sizes, dim=0)), b
