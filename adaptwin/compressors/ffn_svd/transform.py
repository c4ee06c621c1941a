"""FFN matrices (fc1/fc2, gate/up/down) by independent truncated SVD concatenated with LoRA factors.

With calibration statistics the SVD is of the activation-whitened weight, so the truncation minimises
the error of the layer's outputs on those activations rather than of its weights (see `factorize`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptwin.architectures.base import LinearSite
from adaptwin.compressors.base import Compressor
from adaptwin.compressors.factorize import (
    centred_gram,
    gram_root,
    lora_init,
    matrix_factors,
    whitened_matrix_factors,
)
from adaptwin.compressors.ffn_svd.layer import LowRankLinear


class SVDCompressor(Compressor):
    name = "svd"
    site_kind = "ffn"

    def full_rank(self, site: LinearSite) -> int:
        return min(site.linear.weight.shape)

    def check(self, site: LinearSite, rank: int, lora_rank: int, config: Any) -> None:
        out_f, in_f = site.linear.weight.shape
        if rank > min(out_f, in_f):
            raise ValueError(f"{site.path}: ffn_rank {rank} exceeds the matrix rank {min(out_f, in_f)} "
                             f"({out_f}x{in_f}); allowed: 1..{min(out_f, in_f)}")

    def param_count(self, site: LinearSite, rank: int, lora_rank: int, config: Any) -> int:
        out_f, in_f = site.linear.weight.shape
        return (rank + lora_rank) * (in_f + out_f) + (out_f if site.linear.bias is not None else 0)

    def compress(self, site, rank, lora_rank, config, adapter, stats=None):
        weight, bias = site.linear.weight, site.linear.bias
        out_f, in_f = weight.shape
        self.check(site, rank, lora_rank, config)
        if stats is None:
            left, right = matrix_factors(weight, rank)  # (out, r), (in, r)
        else:
            left, right, bias = whitened_linear(weight, bias, rank, stats["x"])
        if lora_rank:
            right = torch.cat([right, lora_init(right, lora_rank, config.seed, site.path)], 1)
            left = torch.cat([left, left.new_zeros(out_f, lora_rank)], 1)
        spec = {"in_features": in_f, "out_features": out_f, "rank": rank, "lora_rank": lora_rank,
                "bias": bias is not None}
        module = self.build(spec).to_empty(device=weight.device).to(weight.dtype)
        with torch.no_grad():
            module.in_factor.copy_(right.T)
            module.out_factor.copy_(left)
            if bias is not None:
                module.bias.copy_(bias)
        return {site.path: (module, spec)}

    def build(self, spec: dict[str, Any]) -> nn.Module:
        with torch.device("meta"):
            return LowRankLinear(**spec)

    def lora_mask(self, module: nn.Module, spec: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        lora = torch.arange(spec["rank"] + spec["lora_rank"]) >= spec["rank"]  # last lora_rank directions
        masks = {"in_factor": lora[:, None].expand_as(module.in_factor),
                 "out_factor": lora[None, :].expand_as(module.out_factor)}
        if module.bias is not None:
            masks["bias"] = torch.zeros_like(module.bias, dtype=torch.bool)
        return masks

    def describe(self, spec: dict[str, Any]) -> str:
        return f"r={spec['rank']}+{spec['lora_rank']}"


def whitened_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, rank: int, gram: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Factors of y = x·Wᵀ + b minimising the output error ‖X̃(W̃ − Ŵ̃)ᵀ‖ on the calibration inputs.

    Args:
        weight: (out, in); bias: (out,) or None.
        gram: (in+1, in+1) Σ x̃x̃ᵀ of the homogeneous inputs x̃ = [x, 1].

    Returns:
        ``(out_factor (out, rank), in_factor (in, rank), bias)``, float64 factors. With a bias the mean
        input μ needs no rank: the error is weighted by the centred second moment and the bias takes
        the mean's share, b' = b + (W − Ŵ)·μ (the optimum over rank-r Ŵ and any bias; exact at full
        rank, where Ŵ = W and b' = b). Without a bias the uncentred d×d block weights the error.
    """
    gram = gram.to(weight.device, torch.float64)
    if bias is None:
        return (*whitened_matrix_factors(weight, rank, gram_root(gram[:-1, :-1])), None)
    cov, mean = centred_gram(gram)
    left, right = whitened_matrix_factors(weight, rank, gram_root(cov))
    w = weight.double()
    new_bias = bias.double() + w @ mean - left @ (right.T @ mean)  # (out,)
    return left, right, new_bias
