"""Compression methods, one package each; the built-ins register themselves here."""

from adaptwin.compressors.base import Compressor
from adaptwin.compressors.ffn_svd import LowRankLinear, SVDCompressor
from adaptwin.compressors.pqm import PQMCompressor
from adaptwin.compressors.product_twin import ProductTwinCompressor, TwinAttention
from adaptwin.compressors.quantized import EmbeddingCompressor, QuantizedCompressor
from adaptwin.compressors.residual import ResidualCompressor, ResidualLinear
from adaptwin.registry import register_compressor

register_compressor(ProductTwinCompressor())
register_compressor(SVDCompressor())
register_compressor(QuantizedCompressor())
register_compressor(ResidualCompressor())
register_compressor(PQMCompressor())
register_compressor(EmbeddingCompressor())

__all__ = ["Compressor", "LowRankLinear", "PQMCompressor", "ProductTwinCompressor", "QuantizedCompressor",
           "ResidualCompressor", "ResidualLinear", "SVDCompressor", "TwinAttention"]
