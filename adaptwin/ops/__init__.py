"""Operations the compressed modules call. Each has a pure-PyTorch reference that is the test oracle
and the fallback on every device; fused backends (C++ / Triton / CUDA) plug in behind the same names."""

from adaptwin.ops.attention import attend
from adaptwin.ops.rank_linear import rank_linear  # registers torch.ops.adaptwin.rank_linear

__all__ = ["attend", "rank_linear"]
