"""Whisper: encoder self-attention, decoder self- and cross-attention, fc1/fc2 FFN."""

from __future__ import annotations

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


def bart_like_site(path: str, attn: nn.Module, component: str, layer: int, cross: bool = False) -> AttentionSite:
    """Site of a BART-style attention module (q_proj/k_proj/v_proj/out_proj, num_heads, head_dim, scaling)."""
    return AttentionSite(
        path=path, component=component, layer=layer,
        q=Linear.of(attn.q_proj), k=Linear.of(attn.k_proj), v=Linear.of(attn.v_proj), o=Linear.of(attn.out_proj),
        num_heads=attn.num_heads, num_kv_heads=attn.num_heads, head_dim=attn.head_dim,
        scaling=float(attn.scaling), is_causal=bool(attn.is_causal), cross=cross,
        dropout=float(attn.dropout), layer_idx=getattr(attn, "layer_idx", None),
    )


def fc_sites(prefix: str, layer: nn.Module, component: str, i: int, names: tuple[str, ...]) -> list[LinearSite]:
    return [LinearSite(f"{prefix}.{n}", component, i, Linear.of(layer.get_submodule(n)), n) for n in names]


class WhisperAdapter(ArchitectureAdapter):
    model_types = ("whisper",)
    components = ("encoder", "decoder")

    def __init__(self) -> None:
        super().__init__(AttentionConvention(
            positional=("key_value_states", "past_key_values", "attention_mask", "output_attentions"),
            kv_keyword="key_value_states",
            prescale_query=True,  # Whisper multiplies q_proj's output by 1/sqrt(d_h) before the product
        ))

    def _stacks(self, model: nn.Module) -> dict[str, str]:
        stacks = {"encoder": find_prefix(model, ("model.encoder.layers", "encoder.layers"))}
        try:
            stacks["decoder"] = find_prefix(model, ("model.decoder.layers", "decoder.layers"))
        except ValueError:  # WhisperForAudioClassification / encoder-only
            pass
        return stacks

    def layer_stacks(self, model: nn.Module) -> dict[str, str]:
        return self._stacks(model)

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for component, stack in self._stacks(model).items():
            for i, path, layer in iter_layers(model, stack):
                sites.append(bart_like_site(f"{path}.self_attn", layer.self_attn, component, i))
                if component == "decoder":
                    sites.append(bart_like_site(f"{path}.encoder_attn", layer.encoder_attn, component, i, cross=True))
        return sites

    def ffn_sites(self, model: nn.Module) -> list[LinearSite]:
        return [s for component, stack in self._stacks(model).items()
                for i, path, layer in iter_layers(model, stack)
                for s in fc_sites(path, layer, component, i, ("fc1", "fc2"))]

    def activation_pairs(self, model: nn.Module) -> list[tuple[str, str]]:
        return [(f"{path}.fc1", f"{path}.activation_fn") for stack in self._stacks(model).values()
                for _, path, _ in iter_layers(model, stack)]
