"""Multi-head attention on per-head widths that need not match (rank space: q/k width r+l, v width r'+l').

``torch.ops.adaptwin.attention`` (declared once here; the CPU C++ kernel in ``csrc/cpu/attention.cpp``,
the CUDA one in ``csrc/cuda`` and the Triton one in ``kernels/attention.py`` register for exactly this
schema)::

    adaptwin::attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal) -> Tensor

    q        (B, H, T, Dq)   queries in rank space (Dq = r + l, any width: 20, 26, 40, 52, ...), any strides
    k        (B, Hkv, S, Dq) keys; H a multiple of Hkv (grouped-query attention); S may differ from T
                             (cross-attention: queries from the decoder, keys/values from the encoder, or
                             a rank-space KV cache)
    v        (B, Hkv, S, Dv) values; Dv (= r' + l') may differ from Dq
    mask     None, bool broadcastable to (B, H, T, S) with True = attend, or float additive of that shape
    scale    multiplier of q·kᵀ (the original model's, never a default)
    is_causal  key j is visible to query i only when j <= i (top-left aligned, as SDPA)
    returns  (B, T, H, Dv) contiguous, q's dtype: the layout the output projection reads. A query whose
             keys are all masked out (False, or -inf) gets zeros, as SDPA's CPU kernels; a finite additive
             mask, however large (Hugging Face's finfo.min), is added as it is, as SDPA adds it: a query
             with all its keys so masked gets the mean of the values. A NaN or infinite entry of q or k
             makes every row that scores it NaN, as SDPA defines it (a False mask entry adds -inf, so a
             NaN score stays NaN; keys past the causal cut are not read). The fused kernels keep to that
             everywhere; ATen's CPU flash SDPA (the CPU reference) gives finite rows for a NaN query,
             bfloat16 infinities and a NaN single key.

The reference (every device; fallback when no fused kernel is built) is SDPA with the CPU width padding
below. Fused kernels are flash-style: online softmax over key tiles, so no T×S matrix reaches memory.
Autograd: gradients to q, k and v (explicit softmax backward, which does form the T×S probabilities;
`attend` keeps training calls on SDPA's own autograd). `attend` is the module-facing wrapper: it
follows Hugging Face's mask conventions and routes inference calls to the op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptwin.ops.backends import FAST, _is_compiling, call_without_autograd

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
# csrc/cpu/attention.cpp (sdpa_width, kSdpaPadMinScores) carries the same rule for the CPU kernel's SDPA route
# (CPUs without AVX-512); tests/test_kernels_portable.py checks the two give the same bits.


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

    Inference calls (no dropout, no gradient needed, no weights) go to ``torch.ops.adaptwin.attention``,
    whose backend the dispatcher picks (C++ / CUDA / Triton kernel, or the SDPA reference); training
    calls use SDPA and its autograd directly. On CPU, for T·S >= 256², the SDPA path zero-pads q, k and v
    to one head width that its flash kernel runs fast at (see `_cpu_width`); exact, and it keeps SDPA on
    that kernel when Dq != Dv.
    """
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"compressed attention needs a tensor mask or None, got {type(mask).__name__}; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    groups = q.shape[1] // k.shape[1] if k.dim() == 4 and k.shape[1] else 0  # the op refuses 0 key heads
    causal = is_causal and mask is None and q.shape[2] > 1
    if causal and k.shape[2] > q.shape[2]:  # as HF's SDPA path: keep the first T keys (top-left alignment)
        k, v = k[:, :, : q.shape[2]], v[:, :, : q.shape[2]]
    if need_weights:
        _check_attention(q, k, v, mask, scale)
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
    if dropout == 0.0 and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        fast = FAST.get("attention") if _run_op is _OP else None  # adaptwin._C's entry (backends.FAST)
        if fast is not None and not _is_compiling():
            out = fast(q, k, v, mask, float(scale), causal)
            if out is not NotImplemented:
                return out, None  # (B, T, H, Dv)
        return call_without_autograd(_run_op, q, k, v, mask, float(scale), causal), None  # (B, T, H, Dv)
    return _sdpa(q, k, v, mask, scale, causal, dropout).transpose(1, 2), None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool,
          dropout: float = 0.0) -> Tensor:
    """SDPA on (B, H, T, D) heads, zero-padded to a fast width on CPU; returns (B, H, T, Dv)."""
    dv = v.shape[-1]
    if mask is not None and mask.dim() < 2:  # broadcasts like any other mask, but SDPA indexes its last two dims
        mask = mask.reshape(1, mask.shape[0] if mask.dim() else 1)
    if causal and mask is not None:  # CUDA's SDPA refuses both: the causal rule folded into the mask
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()  # top-left aligned
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
        causal = False
    if mask is not None and mask.dtype not in (torch.bool, q.dtype, torch.float32):  # SDPA takes only these
        mask = mask.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    width = _sdpa_width(q, k, v)
    if width is not None:
        q, k, v = _pad_last(q, width), _pad_last(k, width), _pad_last(v, width)  # (B, H|Hkv, T|S, width)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # (B, H, T, width)
    return out[..., :dv] if width is not None else out  # (B, H, T, Dv)


def _check_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None) -> None:
    """The op's input rules, raised as ValueError naming the problem (the C++ kernels check the same)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, T|S, D), got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if not q.is_floating_point():
        raise ValueError(f"attention: q must be floating (float32, float64, float16 or bfloat16), got {q.dtype}")
    devices = {t.device for t in (q, k, v, mask) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"attention: q, k, v and mask must be on one device, got {sorted(map(str, devices))}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    (b, h, t, dq), (bk, hkv, s, dk), (bv, hv, sv, _) = q.shape, k.shape, v.shape
    if bk != b or bv != b or dk != dq or hv != hkv or sv != s:
        raise ValueError(f"attention: shapes do not match: q {tuple(q.shape)} (B, H, T, Dq), k {tuple(k.shape)} "
                         f"(B, Hkv, S, Dq), v {tuple(v.shape)} (B, Hkv, S, Dv)")
    if hkv == 0 or h % hkv:
        raise ValueError(f"attention: query heads ({h}) must be a multiple of key heads ({hkv})")
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"attention: mask must be bool (True = attend) or floating (added to the scores), "
                             f"got {mask.dtype}")
        target = (b, h, t, s)
        if mask.dim() > 4 or any(m != 1 and m != n for m, n in zip(reversed(mask.shape), reversed(target))):
            raise ValueError(f"attention: mask of shape {tuple(mask.shape)} does not broadcast to (B, H, T, S) = "
                             f"{tuple(target)}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"attention: scale must be a finite number, got {scale}")


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                        is_causal: bool) -> Tensor:
    """The op's reference: SDPA (width-padded on CPU) -> (B, T, H, Dv) contiguous."""
    _check_attention(q, k, v, mask, scale)
    return _sdpa(q, k, v, mask, scale, is_causal).transpose(1, 2).contiguous()


@torch.library.custom_op("adaptwin::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, is_causal: bool) -> Tensor:
    return attention_reference(q, k, v, mask, scale, is_causal)


@attention.register_fake
def _(q, k, v, mask, scale, is_causal):
    _check_attention(q, k, v, mask, scale)
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1]))


def _probabilities(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, is_causal: bool) -> Tensor:
    """softmax(q·kᵀ·scale + mask) in float32 (float64 for float64 inputs), (B, H, T, S); fully masked rows
    are 0 (as the op's output)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    dt = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale  # (B, H, T, S)
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(dt)
    p = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, mask, scale, is_causal = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.scale, ctx.is_causal = scale, is_causal


def _attention_backward(ctx, g: Tensor):
    q, k, v, mask = ctx.saved_tensors
    groups = q.shape[1] // k.shape[1]
    p = _probabilities(q, k, mask, ctx.scale, ctx.is_causal)  # (B, H, T, S), recomputed rather than saved
    dt = p.dtype
    go = g.transpose(1, 2).to(dt)  # (B, H, T, Dv)
    vf = v.to(dt).repeat_interleave(groups, dim=1) if groups > 1 else v.to(dt)
    kf = k.to(dt).repeat_interleave(groups, dim=1) if groups > 1 else k.to(dt)
    gv = p.transpose(-1, -2) @ go  # (B, H, S, Dv)
    gp = go @ vf.transpose(-1, -2)  # (B, H, T, S)
    gs = p * (gp - (gp * p).sum(-1, keepdim=True)) * ctx.scale  # (B, H, T, S)
    gq = gs @ kf  # (B, H, T, Dq)
    gk = gs.transpose(-1, -2) @ q.to(dt)  # (B, H, S, Dq)
    if groups > 1:  # sum the query heads that share each key/value head
        gk = gk.unflatten(1, (k.shape[1], groups)).sum(2)
        gv = gv.unflatten(1, (v.shape[1], groups)).sum(2)
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None, None


attention.register_autograd(_attention_backward, setup_context=_attention_setup)

# What `attend` calls for inference: the op (the dispatcher picks the C++ / CUDA / Triton kernel or the
# reference). A module global so that a benchmark can point it at `attention_reference` to compare.
_OP = torch.ops.adaptwin.attention
_run_op = _OP
