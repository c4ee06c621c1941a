"""Quantised low-rank factors (NF4 / int8) on top of the product-twin and FFN-SVD compressors."""

from adaptwin.compressors.quantized.embedding import (
    EmbeddingCompressor,
    QuantEmbedding,
    QuantTiedLinear,
    input_embedding,
    quantize_embeddings,
)
from adaptwin.compressors.quantized.layer import QuantLinear, QuantLowRankLinear, fake_quantize
from adaptwin.compressors.quantized.transform import (
    QuantizedCompressor,
    logical_params,
    pack_modules,
    quantize_modules,
)

__all__ = ["EmbeddingCompressor", "QuantEmbedding", "QuantLinear", "QuantLowRankLinear", "QuantTiedLinear",
           "QuantizedCompressor", "fake_quantize", "input_embedding", "logical_params", "pack_modules",
           "quantize_embeddings", "quantize_modules"]
