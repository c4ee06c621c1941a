"""`PQMConfig`: the PQM compressor's options, read from ``CompressionConfig.method_options["pqm"]``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from adaptwin.quant import QuantFormat

# The PQM paper (arXiv 2309.09136) adapts with LoRA ranks 1 to 4; a larger rank stops being a few-shot
# speaker adapter (20-30 utterances cannot fit it) and is refused rather than silently allowed.
LORA_RANKS = (1, 2, 3, 4)


def check_lora_rank(rank: Any, what: str = "pqm LoRA rank") -> int:
    """``rank`` if it is one of `LORA_RANKS`, else ``ValueError`` naming the allowed values."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank not in LORA_RANKS:
        raise ValueError(f"{what} must be one of {list(LORA_RANKS)} (PQM adapts with rank 1-4), got {rank!r}")
    return rank


@dataclass
class PQMConfig:
    """How the frozen base is stored and how the LoRA update is scaled.

    The LoRA rank itself comes from `CompressionConfig` (``attention_rank`` / ``ffn_rank``, 1-4), or from
    `adaptwin.compressors.pqm.quantize`'s ``lora_rank``.

    Args:
        blocksize: NF4 elements per absmax scale (even, default 64 as in QLoRA / bitsandbytes).
        double_quant: quantise the block scales too (8-bit, blocks of 256; QLoRA's double quantisation).
        alpha: LoRA scaling numerator: the update is ``(alpha / rank)·x·Aᵀ·B``. ``None`` means alpha = rank
            (scaling 1), so the learning rate alone sets the adapter's step size at every rank.
        quantize_embeddings: also store the input token embedding (and a head tied to it) in the base's NF4
            format (`adaptwin.compressors.quantized.embedding`); frozen, like the base.
    """

    blocksize: int = 64
    double_quant: bool = False
    alpha: float | None = None
    quantize_embeddings: bool = False

    def __post_init__(self) -> None:
        self.quant_format()  # validates blocksize and double_quant with quant's own messages
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not self.alpha > 0):
            raise ValueError(f"pqm alpha must be a number > 0 or None (= the LoRA rank), got {self.alpha!r}")
        if not isinstance(self.quantize_embeddings, bool):
            raise ValueError(f"pqm quantize_embeddings must be True or False, got {self.quantize_embeddings!r}")

    def quant_format(self) -> QuantFormat:
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"pqm double_quant must be True or False, got {self.double_quant!r}")
        return QuantFormat("nf4", self.blocksize, self.double_quant)

    def scaling(self, rank: int) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / rank

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> PQMConfig:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown pqm options {unknown}; allowed: {sorted(known)}")
        return cls(**options)

    @classmethod
    def of(cls, config: Any, name: str = "pqm") -> PQMConfig:
        """The options a `CompressionConfig` gives the compressor registered as ``name``."""
        return cls.from_options(getattr(config, "method_options", {}).get(name))
