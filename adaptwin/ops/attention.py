"""Multi-head attention on per-head widths that need not match (rank space: q/k width r+l, v width r'+l').

Reference implementation on SDPA; it follows Hugging Face's mask conventions so a compressed module
can take whatever mask the model built (None, boolean "attend" mask, or additive float mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    *,
    is_causal: bool = False,
    dropout: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q·kᵀ·scale + mask)·v per head.

    Args:
        q: (B, H, T, Dq) queries.
        k: (B, Hkv, S, Dq) keys; H must be a multiple of Hkv (grouped-query attention).
        v: (B, Hkv, S, Dv) values; Dv may differ from Dq.
        mask: None, bool (B|1, H|1, T, S) with True = attend, or float additive of that shape.
        scale: multiplier of the scores; pass the original model's (1/sqrt(d_h)), never a default.
        is_causal: apply a causal mask (only used when ``mask`` is None and T > 1, as HF does).
        dropout: attention dropout probability (training only; the caller passes 0 in eval).
        need_weights: also return the (B, H, T, S) probabilities (runs the explicit path).

    Returns:
        (B, T, H, Dv) output (transposed for the output projection) and the weights or None.
    """
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"compressed attention needs a tensor mask or None, got {type(mask).__name__}; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    groups = q.shape[1] // k.shape[1]
    causal = is_causal and mask is None and q.shape[2] > 1
    if need_weights:
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, T, S)
        if causal:
            t, s = scores.shape[-2:]
            keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
            scores = scores.masked_fill(~keep, float("-inf"))
        elif mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=dropout > 0)
        return torch.matmul(weights, v).transpose(1, 2), weights
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=groups > 1
    )  # (B, H, T, Dv)
    return out.transpose(1, 2), None
