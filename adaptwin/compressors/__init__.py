"""Compression methods, one package each; the built-ins register themselves here."""

from adaptwin.compressors.base import Compressor
from adaptwin.compressors.ffn_svd import LowRankLinear, SVDCompressor
from adaptwin.compressors.product_twin import ProductTwinCompressor, TwinAttention
from adaptwin.registry import register_compressor

register_compressor(ProductTwinCompressor())
register_compressor(SVDCompressor())

__all__ = ["Compressor", "LowRankLinear", "ProductTwinCompressor", "SVDCompressor", "TwinAttention"]
