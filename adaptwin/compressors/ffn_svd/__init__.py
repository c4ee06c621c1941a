"""Independent truncated SVD + LoRA of FFN matrices."""

from adaptwin.compressors.ffn_svd.layer import LowRankLinear
from adaptwin.compressors.ffn_svd.transform import SVDCompressor

__all__ = ["LowRankLinear", "SVDCompressor"]
