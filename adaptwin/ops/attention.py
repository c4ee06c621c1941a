"""Multi-head attention on per-head widths that need not match (rank space: q/k width r+l, v width r'+l').

Reference implementation on SDPA; it follows Hugging Face's mask conventions so a compressed module
can take whatever mask the model built (None, boolean "attend" mask, or additive float mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# CPU SDPA (the flash kernel) wants one head width for q, k and v (else it falls back to the math path,
# which materialises every T×S score matrix), and its blocked GEMMs are markedly slower at some widths.
# Sweep of D = 2..129 at (1, 6, 1500, D), 2 threads, p20: a sawtooth with minima at multiples of 8 and the
# deepest at multiples of 16 (fp32: 31 → 18.6 ms, 32 → 13.2; 39 → 20.0, 40 → 16.7; 47 → 23.1, 48 → 17.5),
# odd widths worst, while padding far costs its FLOPs (17 → 24 is 10.8 → 11.8 ms, 34 → 40 is 15.6 → 16.7);
# below 16 every width is slower than 16 itself (8 → 12.6 ms, 11 → 17.6, 16 → 8.7). `_cpu_width` pads
# widths up to 16 to 16, and others to the next multiple of 8 when that lands on a multiple of 16, adds at
# most 2 columns, or fixes an odd width with at most 5 (chosen on D = 16..65, checked on a second sweep).
# Against the fastest of {D, next ×8, next ×16} it loses 0.2 ms summed over D = 2..129 in fp32 and 1.2 ms
# in bf16 (always padding to ×8: 47 and 34 ms; never padding: 251 and 234 ms). Zero columns change
# neither q·kᵀ nor the kept columns of p·v, so padding is exact.
# Padding copies q, k and v, which costs more than it saves on small problems: at D = 39, T = S = 128 it
# took 0.232 → 0.267 ms, at 256 0.666 → 0.618 ms, and decoding (T = 1, S = 1500) 0.40 → 0.96 ms.
_CPU_PAD_MIN_SCORES = 256 * 256  # T·S per head below which q/k/v go to SDPA unpadded


def _cpu_width(d: int) -> int:
    """The head width SDPA runs fastest at on CPU for a problem of width ``d`` (see the sweep above)."""
    if d <= 16:
        return 16
    w8 = -(-d // 8) * 8
    pad = w8 - d
    return w8 if w8 % 16 == 0 or pad <= 2 or (d % 2 == 1 and pad <= 5) else d


def _sdpa_width(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int | None:
    """The head width to zero-pad q/k/v to before SDPA, or None to call it as is."""
    if q.device.type != "cpu" or q.shape[-2] * k.shape[-2] < _CPU_PAD_MIN_SCORES:
        return None
    dq, dv = q.shape[-1], v.shape[-1]
    width = _cpu_width(max(dq, dv))
    return None if width == dq == dv else width


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


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
        is_causal: apply a causal mask (only used when ``mask`` is None and T > 1, as HF does); aligned
            top-left like SDPA, keys beyond the first T are dropped as HF's SDPA path does.
        dropout: attention dropout probability (training only; the caller passes 0 in eval).
        need_weights: also return the (B, H, T, S) probabilities (runs the explicit path).

    Returns:
        (B, T, H, Dv) output (transposed for the output projection) and the weights or None.

    On CPU, for T·S >= 256², the SDPA path zero-pads q, k and v to one head width that its flash
    kernel runs fast at (see `_cpu_width`); exact, and it keeps SDPA on that kernel when Dq != Dv.
    """
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"compressed attention needs a tensor mask or None, got {type(mask).__name__}; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    groups = q.shape[1] // k.shape[1]
    causal = is_causal and mask is None and q.shape[2] > 1
    if causal and k.shape[2] > q.shape[2]:  # as HF's SDPA path: keep the first T keys (top-left alignment)
        k, v = k[:, :, : q.shape[2]], v[:, :, : q.shape[2]]
    if need_weights:
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, T, S)
        if causal:
            keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()  # SDPA's alignment
            scores = scores.masked_fill(~keep, float("-inf"))
        elif mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=dropout > 0)
        return torch.matmul(weights, v).transpose(1, 2), weights
    dv = v.shape[-1]
    width = _sdpa_width(q, k, v)
    if width is not None:
        q, k, v = _pad_last(q, width), _pad_last(k, width), _pad_last(v, width)  # (B, H|Hkv, T|S, width)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=groups > 1
    )  # (B, H, T, width)
    if width is not None:
        out = out[..., :dv]  # (B, H, T, Dv)
    return out.transpose(1, 2), None
