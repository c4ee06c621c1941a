"""ResidualTransformer weight sharing: W_i ≈ W_shared + A_i·B_iᵀ + diag(d_i) over groups of adjacent layers."""

from adaptwin.compressors.residual.config import ResidualConfig
from adaptwin.compressors.residual.init import GroupFactors, residual_factors
from adaptwin.compressors.residual.layer import ResidualLinear
from adaptwin.compressors.residual.transform import ResidualCompressor

__all__ = ["GroupFactors", "ResidualCompressor", "ResidualConfig", "ResidualLinear", "residual_factors"]
