"""Llama: rotary embeddings (so only the VO twin applies), grouped-query attention, gated FFN."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from adaptwin.architectures.base import (
    ArchitectureAdapter,
    AttentionConvention,
    AttentionSite,
    Linear,
    LinearSite,
    find_prefix,
    iter_layers,
)

_llama_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's own ``apply_rotary_pos_emb``, imported on the first call: its module pulls in transformers'
    modeling stack, which took 1.5 of ``import adaptwin``'s 4.3 s (``python -X importtime``) and which a
    model without rotary embeddings never needs."""
    global _llama_rotary
    if _llama_rotary is None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rotary

        _llama_rotary = rotary
    return _llama_rotary(q, k, cos, sin)


class LlamaAdapter(ArchitectureAdapter):
    model_types = ("llama",)
    components = ("decoder",)

    def __init__(self) -> None:
        super().__init__(AttentionConvention(
            positional=("position_embeddings", "attention_mask", "past_key_values"),
            apply_rotary=apply_rotary_pos_emb,
        ))

    def _stack(self, model: nn.Module) -> str:
        return find_prefix(model, ("model.layers", "layers"))

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for i, path, layer in iter_layers(model, self._stack(model)):
            a = layer.self_attn
            sites.append(AttentionSite(
                path=f"{path}.self_attn", component="decoder", layer=i,
                q=Linear.of(a.q_proj), k=Linear.of(a.k_proj), v=Linear.of(a.v_proj), o=Linear.of(a.o_proj),
                num_heads=a.config.num_attention_heads, num_kv_heads=a.config.num_key_value_heads,
                head_dim=a.head_dim, scaling=float(a.scaling), is_causal=True, rotary=True,
                dropout=float(a.attention_dropout), layer_idx=a.layer_idx,
            ))
        return sites

    def ffn_sites(self, model: nn.Module) -> list[LinearSite]:
        return [LinearSite(f"{path}.mlp.{n}", "decoder", i, Linear.of(layer.mlp.get_submodule(n)), n)
                for i, path, layer in iter_layers(model, self._stack(model))
                for n in ("gate_proj", "up_proj", "down_proj")]
