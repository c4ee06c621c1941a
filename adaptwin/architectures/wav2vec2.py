"""Wav2Vec2 and HuBERT: encoder self-attention (BART-style projections) and the feed-forward block."""

from __future__ import annotations

from torch import nn

from adaptwin.architectures.base import ArchitectureAdapter, AttentionConvention, find_prefix, iter_layers
from adaptwin.architectures.whisper import bart_like_site, fc_sites


class Wav2Vec2Adapter(ArchitectureAdapter):
    model_types = ("wav2vec2", "hubert")
    components = ("encoder",)

    def __init__(self) -> None:
        super().__init__(AttentionConvention(
            positional=("key_value_states", "attention_mask", "output_attentions"),
            kv_keyword="key_value_states",
        ))

    def _stack(self, model: nn.Module) -> str:
        return find_prefix(model, ("wav2vec2.encoder.layers", "hubert.encoder.layers", "encoder.layers"))

    def attention_sites(self, model: nn.Module):
        return [bart_like_site(f"{path}.attention", layer.attention, "encoder", i)
                for i, path, layer in iter_layers(model, self._stack(model))]

    def ffn_sites(self, model: nn.Module):
        names = ("feed_forward.intermediate_dense", "feed_forward.output_dense")
        return [s for i, path, layer in iter_layers(model, self._stack(model))
                for s in fc_sites(path, layer, "encoder", i, names)]

    def activation_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        return [(f"{path}.feed_forward.intermediate_dense", f"{path}.feed_forward.intermediate_act_fn")
                for _, path, _ in iter_layers(model, self._stack(model))]
