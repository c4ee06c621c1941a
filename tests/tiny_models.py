"""Tiny random Hugging Face models, one row per architecture adapter, for the shared test battery.

Each row builds its model from a fixed seed and re-initialises every parameter so that errors are
meaningful: matrices N(0, std²) with std 0.1-0.3 (HF's default 0.02 makes attention nearly uniform and
hides scaling or rank mistakes), every bias non-zero (so bias folding is really exercised), and norm
gains near 1. A new architecture gets the whole battery in tests/test_architectures.py by adding one
`Row` to `ROWS`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import adaptwin
from adaptwin.compressors import TwinAttention


def reinit(model: nn.Module, seed: int, std: float, bias_std: float = 0.1) -> nn.Module:
    """Overwrite every parameter: matrices and embeddings N(0, std²), biases N(0, bias_std²), gains 1 ± 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.endswith("bias"):
                p.copy_(noise * bias_std)
            elif p.ndim == 1:  # LayerNorm / RMSNorm gains, wav2vec2's masked_spec_embed
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise * std)
    return model.eval()


@dataclass(frozen=True)
class Row:
    """One architecture in the battery.

    ``build(attn_implementation)`` returns the tiny model in eval mode (same weights every call);
    ``inputs()`` its forward kwargs (fixed seed); ``output(model_output)`` the tensor compared.
    ``d_model`` is the FFN matrices' full rank (every FFN dim here is >= d_model), ``head_dim`` the
    attention twins' full rank.
    """

    name: str
    build: Callable[[str], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    output: Callable[[Any], torch.Tensor]
    d_model: int
    head_dim: int
    twins: tuple[str, ...] = ("qk", "vo")
    generate: Callable[..., Any] | None = None  # generate(model, **kwargs): greedy, cached, 10 new tokens


# ---------------------------------------------------------------------------------------------- whisper

def whisper(attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
        max_source_positions=25, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
        eos_token_id=2, bos_token_id=1, begin_suppress_tokens=None, suppress_tokens=None,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return reinit(WhisperForConditionalGeneration(cfg), seed=1, std=0.3)


def whisper_inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(2)
    return {
        "input_features": torch.randn(2, 16, 50, generator=gen),  # (B, mels, 2·max_source_positions)
        "decoder_input_ids": torch.randint(3, 64, (2, 7), generator=gen),
    }


def whisper_generate(model: nn.Module, **kwargs: Any) -> Any:
    kwargs.setdefault("num_beams", 1)
    return model.generate(
        whisper_inputs()["input_features"], max_new_tokens=10, do_sample=False,
        output_scores=True, return_dict_in_generate=True, **kwargs,
    )


# --------------------------------------------------------------------------------------- wav2vec2 / hubert

def _speech_config(cls: type, attn_implementation: str, stable: bool) -> Any:
    return cls(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), conv_bias=True,
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, do_stable_layer_norm=stable,
        feat_extract_norm="layer" if stable else "group", mask_time_prob=0.0,
        attn_implementation=attn_implementation,
    )


def wav2vec2(attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    return reinit(Wav2Vec2Model(_speech_config(Wav2Vec2Config, attn_implementation, stable=False)), seed=3, std=0.2)


def hubert(attn_implementation: str = "sdpa") -> nn.Module:
    # The stable-layer-norm variant, so both encoder layer classes of the family are exercised.
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    return reinit(HubertModel(_speech_config(HubertConfig, attn_implementation, stable=True)), seed=4, std=0.2)


def speech_inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(5)
    mask = torch.ones(2, 400, dtype=torch.long)
    mask[1, 300:] = 0  # the second clip is shorter: its padded frames are masked out as keys
    return {"input_values": torch.randn(2, 400, generator=gen), "attention_mask": mask}  # 400 samples -> 39 frames


# ------------------------------------------------------------------------------------------- bert / roberta

def _bert_config(cls: type, attn_implementation: str) -> Any:
    return cls(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=2, pad_token_id=0, attn_implementation=attn_implementation,
    )


def bert(attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return reinit(BertModel(_bert_config(BertConfig, attn_implementation)), seed=6, std=0.2)


def roberta(attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    return reinit(RobertaModel(_bert_config(RobertaConfig, attn_implementation)), seed=7, std=0.2)


def text_inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(3, 100, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding in the second row, so the padding mask reaches the attention
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------------- gpt2

def gpt2(attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return reinit(GPT2LMHeadModel(cfg), seed=9, std=0.3)


LM_PAD = 3  # left padding of the second prompt


def lm_inputs() -> dict[str, Any]:
    # Batched prompts of different lengths, left-padded as for generation, so masks reach the attention.
    gen = torch.Generator().manual_seed(10)
    ids = torch.randint(3, 100, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    ids[1, :LM_PAD], mask[1, :LM_PAD] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def lm_output(out: Any) -> torch.Tensor:
    """Logits of the real tokens only.

    A left-padded query row is masked against every key; SDPA returns zeros there, so the original
    emits its output bias b_O while the VO twin emits b_O + Σ W_O·b_V (the value-bias fold assumes
    probability rows that sum to 1). Those rows are never attended to, so they cannot reach a real
    token or a generated one; they are excluded here rather than hidden behind a loose tolerance.
    """
    return torch.cat([out.logits[0], out.logits[1, LM_PAD:]])  # (T + T - pad, V)


def lm_generate(model: nn.Module, **kwargs: Any) -> Any:
    kwargs.setdefault("use_cache", True)
    kwargs.setdefault("num_beams", 1)
    return model.generate(
        **lm_inputs(), max_new_tokens=10, min_new_tokens=10, do_sample=False,
        output_scores=True, return_dict_in_generate=True, **kwargs,
    )


# -------------------------------------------------------------------------------------------------- llama

def llama(attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return reinit(LlamaForCausalLM(cfg), seed=11, std=0.3)


ROWS: list[Row] = [
    Row("whisper", whisper, whisper_inputs, lambda o: o.logits, d_model=32, head_dim=8, generate=whisper_generate),
    Row("wav2vec2", wav2vec2, speech_inputs, lambda o: o.last_hidden_state, d_model=32, head_dim=8),
    Row("hubert", hubert, speech_inputs, lambda o: o.last_hidden_state, d_model=32, head_dim=8),
    Row("bert", bert, text_inputs, lambda o: o.last_hidden_state, d_model=32, head_dim=8),
    Row("roberta", roberta, text_inputs, lambda o: o.last_hidden_state, d_model=32, head_dim=8),
    Row("gpt2", gpt2, lm_inputs, lm_output, d_model=32, head_dim=8, generate=lm_generate),
    Row("llama", llama, lm_inputs, lm_output, d_model=32, head_dim=8, twins=("vo",), generate=lm_generate),
]

ROW_BY_NAME = {r.name: r for r in ROWS}


# ------------------------------------------------------------------------- calibration, for fine-tuning tests

FT_ROWS = ("bert", "whisper", "gpt2", "llama")  # the rows `calibration` makes batches for


def calibration(name: str, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` distinct batches shaped like the row's inputs, each with padding so masks reach the layers."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if name == "whisper":
            dmask = torch.ones(2, 7, dtype=torch.long)
            dmask[1, 5:] = 0  # right-padded decoder row: decoder layers get a 4-D mask
            out.append({"input_features": torch.randn(2, 16, 50, generator=gen),
                        "decoder_input_ids": torch.randint(3, 64, (2, 7), generator=gen),
                        "decoder_attention_mask": dmask})
        else:
            ids = torch.randint(3, 100, (2, 9), generator=gen)
            mask = torch.ones(2, 9, dtype=torch.long)
            if name == "bert":
                mask[1, 6:] = 0  # right padding
            else:
                ids[1, :3], mask[1, :3] = 0, 0  # left padding, as for generation
            out.append({"input_ids": ids, "attention_mask": mask})
    return out


def leaves(obj) -> list[torch.Tensor | None]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in leaves(x)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in leaves(obj[k])]
    return []


# ----------------------------------------------------------------- the architecture battery's shared checks
# (tests/test_architectures.py and tests/test_rank_space.py)

EXACT_REL = 1e-5  # "exact": relative Frobenius error in fp32; why 1e-5, see tests/test_architectures.py


@functools.cache
def original(name: str, attn_implementation: str = "sdpa") -> nn.Module:
    """One tiny model per row and attention implementation; tests never modify it (test_original_untouched)."""
    return ROW_BY_NAME[name].build(attn_implementation)


@functools.cache
def reference(name: str) -> torch.Tensor:
    row = ROW_BY_NAME[name]
    with torch.no_grad():
        return row.output(original(name)(**row.inputs()))


def run(row: Row, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return row.output(model(**row.inputs()))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def full_rank(row: Row, lora: int = 0) -> adaptwin.CompressionConfig:
    return adaptwin.CompressionConfig(attention_rank=row.head_dim, attention_lora_rank=lora, ffn_rank=row.d_model,
                                      ffn_lora_rank=lora, twins=row.twins)


def twin_modules(model: nn.Module) -> dict[str, TwinAttention]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TwinAttention)}


def layout(model: nn.Module) -> dict[str, str]:
    # Class names, not classes: parametrised modules (wav2vec2's weight-normed positional conv) get a
    # fresh class per instance.
    return {n: type(m).__name__ for n, m in model.named_modules()}


def attention_sites(model: nn.Module):
    return adaptwin.get_architecture(model.config.model_type).attention_sites(model)
