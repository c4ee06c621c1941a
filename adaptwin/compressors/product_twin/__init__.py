"""AdaPTwin product twins (arXiv 2406.08904): rank-space attention from SVD of W_Qᵀ·W_K and W_Vᵀ·W_Oᵀ."""

from adaptwin.compressors.product_twin.layer import TwinAttention
from adaptwin.compressors.product_twin.transform import ProductTwinCompressor

__all__ = ["ProductTwinCompressor", "TwinAttention"]
