"""PQM (arXiv 2309.09136): NF4-quantised linears with LoRA for few-shot speaker adaptation.

    small = quantize(model, lora_rank=4)                 # every attention/FFN linear: NF4 base + LoRA
    adaptwin.adapt(small, batches)                       # train only the LoRA factors on one speaker
    adaptwin.save(small, "out/"); adaptwin.load("out/")  # packed base + LoRA
"""

from __future__ import annotations

from torch import nn

from adaptwin.compressors.pqm.adapt import AdaptReport, adapt, lora_parameters
from adaptwin.compressors.pqm.config import LORA_RANKS, PQMConfig, check_lora_rank
from adaptwin.compressors.pqm.layer import NF4LoRALinear
from adaptwin.compressors.pqm.transform import PQMCompressor

TARGETS = ("attention", "ffn")


def quantize(model: nn.Module, lora_rank: int = 4, *, targets: tuple[str, ...] = TARGETS,
             components: tuple[str, ...] | None = None, blocksize: int = 64, double_quant: bool = False,
             alpha: float | None = None, seed: int = 0, inplace: bool = False,
             quantize_embeddings: bool = False) -> nn.Module:
    """PQM-quantise ``model``: every targeted linear becomes an NF4 base plus a zero-started rank-r LoRA.

    Args:
        model: a model with a registered architecture adapter (e.g. WhisperForConditionalGeneration).
        lora_rank: r, one of 1-4.
        targets: ``"attention"`` and/or ``"ffn"``: which sites' linears are replaced.
        components: e.g. ``("encoder",)``; None: every component the adapter knows.
        blocksize, double_quant, alpha, quantize_embeddings: see `PQMConfig`. seed: the LoRA A factors' draw.
        inplace: replace modules in ``model`` itself instead of a deep copy.

    Returns the model as `adaptwin.compress` does (``adaptwin_record`` set, eval mode): `adaptwin.save`-able.
    """
    from adaptwin.compress import compress
    from adaptwin.config import CompressionConfig

    check_lora_rank(lora_rank)
    if isinstance(targets, str):
        targets = (targets,)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"pqm targets must be a non-empty subset of {TARGETS}, got {targets!r}")
    options = PQMConfig(blocksize, double_quant, alpha, quantize_embeddings)
    config = CompressionConfig(
        attention_rank=lora_rank if "attention" in targets else None,
        ffn_rank=lora_rank if "ffn" in targets else None,
        attention_method="pqm", ffn_method="pqm", components=components, seed=seed,
        method_options={"pqm": {"blocksize": options.blocksize, "double_quant": options.double_quant,
                                "alpha": options.alpha, "quantize_embeddings": options.quantize_embeddings}})
    return compress(model, config, inplace=inplace)


def is_pqm(model: nn.Module) -> bool:
    """Whether ``model`` has PQM modules (LoRA factors to adapt)."""
    return any(isinstance(m, NF4LoRALinear) for m in model.modules())


__all__ = ["LORA_RANKS", "AdaptReport", "NF4LoRALinear", "PQMCompressor", "PQMConfig", "adapt", "check_lora_rank",
           "is_pqm", "lora_parameters", "quantize"]
