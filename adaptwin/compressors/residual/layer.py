"""`ResidualLinear`: y = x·(S + A·Bᵀ + diag(d))ᵀ + b, with S one Parameter shared by the layers of a group."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualLinear(nn.Module):
    """A linear layer whose weight is a shared full-rank part, its own low-rank part and its own diagonal.

    ``shared`` (out, in) is the same `nn.Parameter` object in every layer of a group, so it is trained once
    with the gradients of all of them, and `adaptwin.save` stores it once (tied tensors). ``in_factor``
    (k, in) and ``out_factor`` (out, k), k = rank + lora_rank, the last ``lora_rank`` directions LoRA's
    (zero-started). ``diag`` (min(out, in),) adds d_j·x_j to output j (the leading square block's diagonal).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, lora_rank: int = 0, diagonal: bool = True,
                 bias: bool = True, shared: nn.Parameter | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.lora_rank = rank, lora_rank
        if shared is not None and tuple(shared.shape) != (out_features, in_features):
            raise ValueError(f"shared weight has shape {tuple(shared.shape)}, expected {(out_features, in_features)}")
        self.shared = shared if shared is not None else nn.Parameter(torch.empty(out_features, in_features))
        k = rank + lora_rank
        self.in_factor = nn.Parameter(torch.empty(k, in_features))
        self.out_factor = nn.Parameter(torch.empty(out_features, k))
        self.diag = nn.Parameter(torch.empty(min(in_features, out_features))) if diagonal else None
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.shared, self.bias)  # (..., out): the dense GEMM of the original layer
        if self.in_factor.shape[0]:
            y = y + F.linear(F.linear(x, self.in_factor), self.out_factor)  # (..., k) -> (..., out)
        if self.diag is not None:
            n = self.diag.shape[0]
            d = x[..., :n] * self.diag  # (..., n)
            y = y + (F.pad(d, (0, self.out_features - n)) if n < self.out_features else d)
        return y

    def dense_weight(self) -> torch.Tensor:
        """The dense (out, in) weight this module applies (for checks; the forward never forms it)."""
        w = self.shared + self.out_factor @ self.in_factor
        if self.diag is not None:
            n = self.diag.shape[0]
            w = w.clone()
            w[:n, :n] += torch.diag(self.diag)
        return w

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, lora_rank={self.lora_rank}, "
                f"diagonal={self.diag is not None}, bias={self.bias is not None}")
