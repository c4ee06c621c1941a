"""`TwinAttention`: an attention block whose heads compute in rank space.

Queries and keys are r_qk + l_qk wide per head, values r_vo + l_vo wide: the product twins
P'·Q'ᵀ ≈ W_Qᵀ·W_K and W_Vᵀ·W_Oᵀ are applied as four thin projections, so no d×d matrix is rebuilt.
The call signature, cache handling and return value follow the family's own attention module
(described by the adapter's `AttentionConvention`), so the module drops into an unmodified model.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptwin.ops import attend
from adaptwin.registry import get_architecture

# Read from transformers' own modules where they are loaded, never imported here: `import adaptwin` stays free
# of `import transformers` (0.6 of its 1.9 s, `python -X importtime`), and a module can only be handed what
# these modules built after they were imported (a model's cache, an active collector).
_CACHE_MODULE = "transformers.cache_utils"
_CAPTURE_MODULE = "transformers.utils.output_capturing"  # transformers >= 5; older releases have none


def _encoder_decoder_cache(cache: Any) -> bool:
    """Whether ``cache`` is a transformers ``EncoderDecoderCache``."""
    module = sys.modules.get(_CACHE_MODULE)
    return module is not None and isinstance(cache, module.EncoderDecoderCache)


def _weights_sink(cross: bool) -> list[torch.Tensor] | None:
    """The list HF is collecting attention probabilities into for this call, or None when none is wanted.

    HF (>= 5) gathers ``output_attentions`` with forward hooks that it installs only on instances of the
    family's own attention class (e.g. ``WhisperAttention``), so a replaced module is invisible to them and
    ``output_attentions=True`` would silently return an empty tuple; the module appends its own probabilities
    instead. Older releases (without that module) return the weights through the call chain.
    """
    collector = getattr(sys.modules.get(_CAPTURE_MODULE), "_active_collector", None)
    collected = collector.get() if collector is not None else None
    if not collected:
        return None
    return collected.get("cross_attentions" if cross else "attentions")


class TwinAttention(nn.Module):
    """Drop-in attention with per-head widths ``qk_width`` (queries/keys) and ``v_width`` (values).

    Args mirror `spec` keys so `TwinAttention(**spec)` rebuilds it; see `ProductTwinCompressor`.
    ``out_size=None`` means the output projection lives outside (BERT's ``output.dense``) and this
    module returns the concatenated per-head values, (B, T, H·v_width).
    """

    def __init__(
        self,
        *,
        architecture: str,
        num_heads: int,
        num_kv_heads: int,
        hidden_size: int,
        kv_hidden_size: int,
        out_size: int | None,
        qk_width: int,
        v_width: int,
        q_bias: bool,
        k_bias: bool,
        v_bias: bool,
        o_bias: bool,
        scaling: float,
        is_causal: bool = False,
        dropout: float = 0.0,
        out_dropout: float = 0.0,
        layer_idx: int | None = None,
        rotary: bool = False,
        qk_rank: int | None = None,
        qk_lora_rank: int = 0,
        vo_rank: int | None = None,
        vo_lora_rank: int = 0,
    ) -> None:
        super().__init__()
        self.architecture = architecture
        self.convention = get_architecture(architecture).convention
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.num_key_value_groups = num_heads // num_kv_heads
        self.qk_width, self.v_width = qk_width, v_width
        self.scaling, self.is_causal, self.dropout = scaling, is_causal, dropout
        self.out_dropout = out_dropout  # dropout the original applies after its own output projection
        self.layer_idx, self.rotary = layer_idx, rotary
        # Spectral rows come first in every head's block, LoRA rows after (fine-tuning reads these).
        self.qk_rank, self.qk_lora_rank = qk_rank, qk_lora_rank
        self.vo_rank, self.vo_lora_rank = vo_rank, vo_lora_rank
        self.q_proj = nn.Linear(hidden_size, num_heads * qk_width, bias=q_bias)
        self.k_proj = nn.Linear(kv_hidden_size, num_kv_heads * qk_width, bias=k_bias)
        self.v_proj = nn.Linear(kv_hidden_size, num_kv_heads * v_width, bias=v_bias)
        self.o_proj = nn.Linear(num_heads * v_width, out_size, bias=o_bias) if out_size else None

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, qk_width={self.qk_width} "
            f"(r={self.qk_rank}, l={self.qk_lora_rank}), v_width={self.v_width} "
            f"(r={self.vo_rank}, l={self.vo_lora_rank}), scaling={self.scaling:.6g}"
        )

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        conv = self.convention
        if len(args) > len(conv.positional):
            raise TypeError(f"{self.architecture} attention takes at most {len(conv.positional) + 1} positional args")
        kwargs.update(zip(conv.positional, args))
        kv_states = kwargs.get(conv.kv_keyword)
        cross = kv_states is not None
        mask = kwargs.get("attention_mask")
        if cross and conv.cross_mask_keyword:
            mask = kwargs.get(conv.cross_mask_keyword)
        # transformers >= 5.2x names the cache ``cache``; earlier 5.x releases ``past_key_values``
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        position_embeddings = kwargs.get("position_embeddings")

        batch, length = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states)  # (B, T, H·w)
        scale = self.scaling
        if conv.prescale_query:  # same order of operations as the original (Whisper)
            q, scale = q * self.scaling, 1.0
        q = q.view(batch, length, self.num_heads, self.qk_width).transpose(1, 2)  # (B, H, T, w)

        is_updated = False
        if _encoder_decoder_cache(cache):
            is_updated = bool(cache.is_updated.get(self.layer_idx))
            if cross:
                cache.is_updated[self.layer_idx] = True
                cache = cache.cross_attention_cache
            else:
                cache = cache.self_attention_cache
        if cross and cache is not None and is_updated:  # encoder keys/values are computed once per sequence
            k, v = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            source = kv_states if cross else hidden_states
            k = self.k_proj(source).view(batch, -1, self.num_kv_heads, self.qk_width).transpose(1, 2)
            v = self.v_proj(source).view(batch, -1, self.num_kv_heads, self.v_width).transpose(1, 2)
            if self.rotary and not cross:
                if position_embeddings is None or conv.apply_rotary is None:
                    raise ValueError(f"{self.architecture} attention needs position_embeddings for rotary")
                cos, sin = position_embeddings
                q, k = conv.apply_rotary(q, k, cos, sin)
            if cache is not None:  # the cache holds rank-space keys/values: (r+l)/d_h of the dense cache
                k, v = cache.update(k, v, self.layer_idx)

        sink = _weights_sink(cross)
        is_causal = kwargs.get("is_causal")  # HF lets a caller override the module's flag per call
        out, weights = attend(
            q, k, v, mask, scale,
            is_causal=(self.is_causal if is_causal is None else bool(is_causal)) and not cross,
            dropout=self.dropout if self.training else 0.0,
            need_weights=sink is not None or bool(kwargs.get("output_attentions")),
        )  # (B, T, H, v_width)
        if sink is not None:
            sink.append(weights)
        out = out.reshape(batch, length, self.num_heads * self.v_width)
        if self.o_proj is not None:
            out = self.o_proj(out)
            out = F.dropout(out, p=self.out_dropout, training=self.training)  # GPT-2's resid_dropout
        return out, weights
