"""`LowRankLinear`: y = (x·Uᵀ)·Vᵀ + b with U = [Σ½V_rᵀ; A_l] and V = [U_rΣ½, B_l]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptwin.ops.activation import ACTIVATIONS, activate, linear_act
from adaptwin.ops.rank_linear import ABSENT, GEMV_ROWS, parameters_of, run_rank_linear, takes_gemv

_FACTORS_AND_BIAS = ("in_factor", "out_factor", "bias")


class LowRankLinear(nn.Module):
    """A linear layer factored through ``rank + lora_rank`` dimensions.

    ``in_factor`` (k, in) and ``out_factor`` (out, k), k = rank + lora_rank; the first ``rank`` of the
    k directions are the SVD's, the last ``lora_rank`` are LoRA's (the fine-tuner reads the split).

    ``activation`` (None, or a name in ``fusable_activations``) is the activation the model applies to
    this layer's output, taken over by `adaptwin.fuse_activations` so that it runs inside the second
    GEMM (`adaptwin.ops.linear_act`); it holds no state and is not saved.
    """

    fusable_activations = tuple(ACTIVATIONS)

    def __init__(self, in_features: int, out_features: int, rank: int, lora_rank: int = 0, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.lora_rank = rank, lora_rank
        k = rank + lora_rank
        self.in_factor = nn.Parameter(torch.empty(k, in_features))
        self.out_factor = nn.Parameter(torch.empty(out_features, k))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.activation: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v, bias = parameters_of(self, _FACTORS_AND_BIAS)
        if takes_gemv(x, (u, v, bias), GEMV_ROWS):  # a decoding step on the CPU
            h = run_rank_linear(x, u, None, "fp", 0, list(u.shape), *ABSENT, None)
            y = run_rank_linear(h, v, None, "fp", 0, list(v.shape), *ABSENT, bias)
            return y if self.activation is None else activate(y, self.activation)
        # (..., in) -> (..., k) -> (..., out); two GEMMs, never the dense out×in weight
        h = F.linear(x, u)
        if self.activation is None:
            return F.linear(h, v, bias)
        return linear_act(h, v, bias, self.activation)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"lora_rank={self.lora_rank}, bias={self.bias is not None}"
                + (f", activation={self.activation}" if self.activation else ""))
