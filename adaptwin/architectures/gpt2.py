"""GPT-2: fused ``c_attn`` Conv1D (d → 3d, weight stored (in, out)) split into Q, K, V; Conv1D FFN."""

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


def conv1d(module: nn.Module, start: int | None = None, stop: int | None = None) -> Linear:
    """HF Conv1D computes x @ weight + bias with weight (in, out): transpose into Linear orientation."""
    weight = module.weight.T[start:stop]
    bias = module.bias[start:stop] if module.bias is not None else None
    return Linear(weight, bias)


class GPT2Adapter(ArchitectureAdapter):
    model_types = ("gpt2",)
    components = ("decoder",)

    def __init__(self) -> None:
        super().__init__(AttentionConvention(
            positional=("past_key_values", "attention_mask", "encoder_hidden_states",
                        "encoder_attention_mask", "output_attentions"),
            kv_keyword="encoder_hidden_states",
            cross_mask_keyword="encoder_attention_mask",
        ))

    def _stack(self, model: nn.Module) -> str:
        return find_prefix(model, ("transformer.h", "h"))

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for i, path, block in iter_layers(model, self._stack(model)):
            attn = block.attn
            d = attn.embed_dim
            sites.append(AttentionSite(
                path=f"{path}.attn", component="decoder", layer=i,
                q=conv1d(attn.c_attn, 0, d), k=conv1d(attn.c_attn, d, 2 * d), v=conv1d(attn.c_attn, 2 * d, 3 * d),
                o=conv1d(attn.c_proj), num_heads=attn.num_heads, num_kv_heads=attn.num_heads,
                head_dim=attn.head_dim, scaling=float(attn.scaling), is_causal=True,
                dropout=float(attn.attn_dropout.p), out_dropout=float(attn.resid_dropout.p), layer_idx=attn.layer_idx,
            ))
        return sites

    def ffn_sites(self, model: nn.Module) -> list[LinearSite]:
        return [LinearSite(f"{path}.mlp.{n}", "decoder", i, conv1d(block.mlp.get_submodule(n)), n)
                for i, path, block in iter_layers(model, self._stack(model)) for n in ("c_fc", "c_proj")]
