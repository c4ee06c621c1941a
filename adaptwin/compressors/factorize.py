"""Factorisations shared by the compressors: truncated SVD of a product, split into two factors."""

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
