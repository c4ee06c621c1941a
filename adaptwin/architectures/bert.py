"""BERT family (MiniLM, sentence-transformers encoders): self-attention whose output projection lives in
``attention.output.dense`` (followed there by dropout, residual and LayerNorm), and the
``intermediate.dense`` / ``output.dense`` FFN."""

from __future__ import annotations

from torch import nn

from adaptwin.architectures.base import (
    ArchitectureAdapter,
    AttentionConvention,
    AttentionSite,
    Linear,
    find_prefix,
    iter_layers,
)
from adaptwin.architectures.whisper import fc_sites


class BertAdapter(ArchitectureAdapter):
    model_types = ("bert", "roberta")
    components = ("encoder",)

    def __init__(self) -> None:
        super().__init__(AttentionConvention(
            positional=("attention_mask", "past_key_values"),
            kv_keyword="encoder_hidden_states",
        ))

    def _stack(self, model: nn.Module) -> str:
        return find_prefix(model, ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"))

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for i, path, layer in iter_layers(model, self._stack(model)):
            sa = layer.attention.self
            sites.append(AttentionSite(
                path=f"{path}.attention.self", component="encoder", layer=i,
                q=Linear.of(sa.query), k=Linear.of(sa.key), v=Linear.of(sa.value),
                o=Linear.of(layer.attention.output.dense),
                num_heads=sa.num_attention_heads, num_kv_heads=sa.num_attention_heads,
                head_dim=sa.attention_head_size, scaling=float(sa.scaling), is_causal=bool(sa.is_causal),
                dropout=float(sa.dropout.p), out_path=f"{path}.attention.output.dense", layer_idx=sa.layer_idx,
            ))
        return sites

    def ffn_sites(self, model: nn.Module):
        return [s for i, path, layer in iter_layers(model, self._stack(model))
                for s in fc_sites(path, layer, "encoder", i, ("intermediate.dense", "output.dense"))]

    def activation_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        return [(f"{path}.intermediate.dense", f"{path}.intermediate.intermediate_act_fn")
                for _, path, _ in iter_layers(model, self._stack(model))]
