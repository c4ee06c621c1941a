"""Llama: rotary embeddings (so only the VO twin applies), grouped-query attention, gated FFN."""

from __future__ import annotations

from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from adaptwin.architectures.base import (
    ArchitectureAdapter,
    AttentionConvention,
    AttentionSite,
    Linear,
    LinearSite,
    find_prefix,
    iter_layers,
)


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
