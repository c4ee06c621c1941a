"""Symmetric absmax int8, per row or per block.

Byte layout of a 2-D tensor W (rows, cols):

    qweight  int8 (rows, cols)     round(W / scale), clamped to [-127, 127] (-128 is never used, so the
                                   code is symmetric and negation is exact)
    scale    float32 (rows,)       per row: max |W[i, :]| / 127                   (blocksize 0)
             float32 (ceil(n/b),)  per block of b consecutive elements of W flat:  (blocksize b > 0)
    W = qweight * scale   (float32, then cast)

A row or block of zeros has scale 0 and codes 0.
"""

from __future__ import annotations

import torch

QMAX = 127


def _check(w: torch.Tensor, blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 0:
        raise ValueError(f"int8 blocksize must be 0 (one scale per row) or a whole number > 0, got {blocksize!r}")
    if w.dim() != 2:
        raise ValueError(f"int8 quantisation takes a 2-D tensor (rows, cols), got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError("cannot quantise an empty tensor")


def _grouped(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(groups, size) view of float32 ``w``: its rows, or its flat blocks (the last zero-padded)."""
    if blocksize == 0:
        return w
    flat = w.reshape(-1)
    if 0 < flat.numel() <= blocksize:  # one block, however large its nominal size: no padding to allocate
        return flat.view(1, -1)
    pad = -flat.numel() % blocksize
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize) if pad else flat.view(-1, blocksize)


def quantize(w: torch.Tensor, blocksize: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight int8 (rows, cols), scale float32)`` of ``w``; see the module docstring for the layout."""
    _check(w, blocksize)
    w = w.detach().float()
    groups = _grouped(w, blocksize)  # (G, size)
    scale = groups.abs().amax(dim=1) / QMAX  # (G,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(groups / safe[:, None]), -QMAX, QMAX).to(torch.int8)
    return q.reshape(-1)[: w.numel()].view(w.shape), scale


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, blocksize: int = 0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantisation ``qweight * scale`` in float32, cast to ``dtype`` (vectorised)."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"int8 data must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    groups = _grouped(qweight.float(), blocksize)
    if scale.shape != (groups.shape[0],):
        kind = "rows" if blocksize == 0 else f"blocks of {blocksize}"
        raise ValueError(f"int8 scale must have shape ({groups.shape[0]},) ({kind}), got {tuple(scale.shape)}")
    out = groups * scale.float()[:, None]
    return out.reshape(-1)[: qweight.numel()].view(qweight.shape).to(dtype)
