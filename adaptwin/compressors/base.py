"""The interface every compressor implements (registered with `adaptwin.register_compressor`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn


class Compressor(ABC):
    """Turns one site found by an architecture adapter into replacement modules.

    ``site_kind`` says which sites it takes: ``"attention"`` (`AttentionSite`) or ``"ffn"``
    (`LinearSite`). A compressor must be able to rebuild its modules empty from the JSON ``spec`` it
    returned, so a saved model loads without the original weights.
    """

    name: ClassVar[str]
    site_kind: ClassVar[str]
    # whether the method exists to remove parameters: `plan` warns when its ranks add some instead (a method
    # that trades parameters for bytes, as PQM's NF4 base + LoRA, sets False)
    reduces_parameters: ClassVar[bool] = True

    @abstractmethod
    def full_rank(self, site: Any) -> int:
        """The rank at which compression is exact (the planner's upper bound)."""

    @abstractmethod
    def param_count(self, site: Any, rank: int, lora_rank: int, config: Any) -> int:
        """Parameters of the site's replacement at this rank, without building it."""

    def check(self, site: Any, rank: int, lora_rank: int, config: Any) -> None:
        """Raise ``ValueError`` (naming the module and the allowed values) if the site cannot take this rank."""
        full = self.full_rank(site)
        if rank > full:
            raise ValueError(f"{site.path}: rank {rank} exceeds the full rank {full}; allowed: 1..{full}")

    @abstractmethod
    def compress(
        self, site: Any, rank: int, lora_rank: int, config: Any, adapter: Any,
        stats: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        """``{module path: (new module, JSON spec to rebuild it)}`` for this site.

        ``stats`` (given for ``FinetuneConfig(init="whiten")``, see `adaptwin.finetune.collect_stats`)
        holds float64 Grams Σ x̃x̃ᵀ of the site's homogeneous calibration inputs x̃ = [x, 1],
        (d+1, d+1): ``"x"`` for the site's input and, for attention sites, ``"kv"`` for the key/value
        input (the encoder states in cross-attention). A compressor that uses them should factor so
        that truncation minimises the output error on those inputs; one that does not may ignore them.
        With ``stats=None`` the result must not depend on any calibration data.
        """

    @abstractmethod
    def build(self, spec: dict[str, Any]) -> nn.Module:
        """An empty module (parameters on the meta device are fine) from a spec returned by `compress`."""

    def lora_mask(self, module: nn.Module, spec: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        """Per trainable parameter name of ``module``: a bool mask of its LoRA entries (None: no LoRA part).

        Fine-tuning uses it for the "LoRA factors only" ablation. The default says the module has no LoRA.
        """
        return {name: None for name, _ in module.named_parameters()}

    def describe(self, spec: dict[str, Any]) -> str:
        """Short human description of a spec for `adaptwin inspect` (e.g. ranks)."""
        return ", ".join(f"{k}={v}" for k, v in spec.items() if "rank" in k)
