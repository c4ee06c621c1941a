"""Operations the compressed modules call. Each has a pure-PyTorch reference that is the test oracle
and the fallback on every device; fused backends (C++ / Triton / CUDA) plug in behind the same names
(see `adaptwin.ops.backends`).

Ops (schemas in the modules' docstrings):
    torch.ops.adaptwin.attention(q, k, v, mask, scale, is_causal) -> (B, T, H, Dv)   rank-space attention
    torch.ops.adaptwin.rank_linear(x, a, a_scale, a_format, a_blocksize, a_shape,
                                   b, b_scale, b_format, b_blocksize, b_shape, bias) -> (..., out)

Beside them, `linear_act` runs ``act(x·Wᵀ + b)`` in one oneDNN primitive on CPU (an FFN's first matrix
with its activation); its reference is the two-step PyTorch form.
"""

from adaptwin.ops import backends
from adaptwin.ops.activation import linear_act
from adaptwin.ops.attention import attend  # also registers torch.ops.adaptwin.attention
from adaptwin.ops.rank_linear import rank_linear  # registers torch.ops.adaptwin.rank_linear

backends.load()  # C++ / Triton kernels where built; the references otherwise

__all__ = ["attend", "linear_act", "rank_linear"]
