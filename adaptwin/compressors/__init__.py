"""Compression methods, one package each; the built-ins register themselves here."""

from adaptwin.compressors.base import Compressor
from adaptwin.compressors.ffn_svd import LowRankLinear, SVDCompressor
from adaptwin.compressors.product_twin import ProductTwinCompressor, TwinAttention
from adaptwin.compressors.quantized import QuantizedCompressor
from adaptwin.registry import register_compressor

register_compressor(ProductTwinCompressor())
register_compressor(SVDCompressor())
register_compressor(QuantizedCompressor())

__all__ = ["Compressor", "LowRankLinear", "ProductTwinCompressor", "QuantizedCompressor", "SVDCompressor",
           "TwinAttention"]
