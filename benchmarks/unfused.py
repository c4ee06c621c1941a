"""The unfused low-rank baseline of benchmarks/whisper_encoder_speed.py: a compressed encoder's *same factors*
multiplied back into d×d products on every call (the correctness reference of the fast path, and what
compressing parameters alone buys in time)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from adaptwin.compressors.ffn_svd.layer import LowRankLinear
from adaptwin.compressors.product_twin.layer import TwinAttention
from adaptwin.ops.activation import ACTIVATIONS


class UnfusedTwinAttention(nn.Module):
    """A `TwinAttention`'s factors applied through per-head d×d products rebuilt on every call.

    Per head h: M_h = P_hᵀ·Q_h (d×d) from the query/key factors, N_h = V_hᵀ·O_hᵀ (d×d_out) from the
    value/output factors; out = Σ_h softmax(s·(x·M_h + b_P,h·Q_h)·xᵀ)·(x·N_h) + b_O + Σ_h O_h·b_V,h.
    A key bias would add q·b_K, constant over keys, which softmax ignores, so it is dropped.
    Self-attention without mask only (the Whisper encoder's case).
    """

    def __init__(self, twin: TwinAttention) -> None:
        super().__init__()
        if twin.num_kv_heads != twin.num_heads or twin.o_proj is None:
            raise ValueError("the unfused baseline covers multi-head attention with its own output projection")
        h, w, wv = twin.num_heads, twin.qk_width, twin.v_width
        d = twin.q_proj.in_features
        d_out = twin.o_proj.out_features
        self.num_heads, self.scaling = h, twin.scaling
        self.q_factor = nn.Parameter(twin.q_proj.weight.detach().view(h, w, d).clone())  # (H, w, d) P_h
        self.k_factor = nn.Parameter(twin.k_proj.weight.detach().view(h, w, d).clone())  # (H, w, d) Q_h
        self.v_factor = nn.Parameter(twin.v_proj.weight.detach().view(h, wv, d).clone())  # (H, wv, d) V_h
        o = twin.o_proj.weight.detach().view(d_out, h, wv).permute(1, 2, 0)  # (H, wv, d_out) O_hᵀ
        self.o_factor = nn.Parameter(o.contiguous())
        self.q_bias = _param_or_none(twin.q_proj.bias, (h, 1, w))  # (H, 1, w)
        self.v_bias = _param_or_none(twin.v_proj.bias, (h, 1, wv))  # (H, 1, wv)
        self.o_bias = _param_or_none(twin.o_proj.bias, (d_out,))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: object) -> tuple[torch.Tensor, None]:
        if attention_mask is not None:
            raise ValueError("the unfused baseline is for the unmasked encoder")
        b, t, d = hidden_states.shape
        m = torch.matmul(self.q_factor.transpose(1, 2), self.k_factor)  # (H, d, d)
        n = torch.matmul(self.v_factor.transpose(1, 2), self.o_factor)  # (H, d, d_out)
        x = hidden_states.unsqueeze(1)  # (B, 1, T, d)
        q = torch.matmul(x, m)  # (B, H, T, d)
        if self.q_bias is not None:
            q = q + torch.matmul(self.q_bias, self.k_factor)  # (H, 1, d)
        k = x.expand(b, self.num_heads, t, d)  # (B, H, T, d): the keys are x itself
        v = torch.matmul(x, n)  # (B, H, T, d_out)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling).sum(1)  # (B, T, d_out)
        if self.v_bias is not None:  # softmax rows sum to 1: the value bias passes straight through
            out = out + torch.matmul(self.v_bias, self.o_factor).sum(0)
        if self.o_bias is not None:
            out = out + self.o_bias
        return out, None

    def flops(self, tokens: int, batch: int) -> dict[str, int]:
        h, w, d = self.q_factor.shape
        wv, d_out = self.o_factor.shape[1:]
        return {
            "rebuild": 2 * h * d * d * w + 2 * h * d * wv * d_out,
            "proj": 2 * batch * tokens * h * d * (d + d_out),
            "qk": 2 * batch * h * tokens * tokens * d,
            "av": 2 * batch * h * tokens * tokens * d_out,
        }


class UnfusedLowRankLinear(nn.Module):
    """A `LowRankLinear` whose dense out×in weight is rebuilt from the factors on every call."""

    def __init__(self, lr: LowRankLinear) -> None:
        super().__init__()
        self.in_factor = nn.Parameter(lr.in_factor.detach().clone())  # (k, in)
        self.out_factor = nn.Parameter(lr.out_factor.detach().clone())  # (out, k)
        self.bias = None if lr.bias is None else nn.Parameter(lr.bias.detach().clone())
        self.activation = lr.activation  # one `adaptwin.fuse_activations` handed over (None: the model's own)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.out_factor @ self.in_factor, self.bias)
        return y if self.activation is None else ACTIVATIONS[self.activation][0](y)

    def flops(self, tokens: int, batch: int) -> dict[str, int]:
        k, d_in = self.in_factor.shape
        d_out = self.out_factor.shape[0]
        return {"rebuild": 2 * d_out * k * d_in, "ffn": 2 * batch * tokens * d_in * d_out}


def _param_or_none(t: torch.Tensor | None, shape: tuple[int, ...]) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().reshape(shape).clone())


def unfuse(encoder: nn.Module) -> nn.Module:
    """A copy of a compressed encoder with every twin and low-rank linear replaced by its unfused form."""
    out = copy.deepcopy(encoder)
    for name, module in list(out.named_modules()):
        if isinstance(module, (TwinAttention, LowRankLinear)):
            parent, _, leaf = name.rpartition(".")
            new = UnfusedTwinAttention(module) if isinstance(module, TwinAttention) else UnfusedLowRankLinear(module)
            setattr(out.get_submodule(parent) if parent else out, leaf, new)
    return out
