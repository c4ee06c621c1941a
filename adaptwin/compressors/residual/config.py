"""`ResidualConfig`: the residual compressor's options, read from ``CompressionConfig.method_options["residual"]``."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

INITS = ("alternating", "mean")
KINDS = ("attention", "ffn")
_KEY = re.compile(r"^(?:default|attention|ffn|[A-Za-z_][A-Za-z0-9_]*(?:\.(?:attention|ffn))?)$")


@dataclass
class ResidualConfig:
    """How layers share weights: W_i ≈ W_shared + A_i·B_iᵀ + diag(d_i) over groups of K adjacent layers.

    The ranks of A_i·B_iᵀ come from `CompressionConfig` (``attention_rank`` for each of the q/k/v/o
    projections, ``ffn_rank`` for each FFN matrix, or planned from ``ratio``); LoRA ranks add zero-started
    trainable directions as in the other compressors.

    Args:
        group_size: K, the number of adjacent layers that share one full-rank matrix per matrix type. An
            int for everything, or a dict whose keys are ``"default"``, a kind (``"attention"``, ``"ffn"``),
            a component (``"encoder"``) or both (``"encoder.ffn"``); the most specific key wins, then
            ``"default"``, then 2. Layers are grouped 0..K-1, K..2K-1, ... (the last group may be smaller).
            K = 1 gives each layer its own full matrix (exact, larger than the original).
        diagonal: give each layer its own diagonal d_i (min(out, in) values).
        init: ``"alternating"`` (block-coordinate descent on Σ‖W_i − S − L_i − D_i‖², starting from the
            mean) or ``"mean"`` (S = mean of the W_i, L_i = truncated SVD of W_i − S, D_i the diagonal of
            what is left: the naive initialisation). With ``FinetuneConfig(init="whiten")`` both minimise
            the output error on the calibration inputs instead, Σ‖X_i (W_i − Ŵ_i)ᵀ‖² (see `residual_factors`).
        iterations: most alternating sweeps.
        tol: stop when a sweep lowers the total squared weight error by less than this fraction of it. On
            all-MiniLM-L6-v2 the sweeps gain little (adjacent pretrained layers share little), so 1e-3 ends
            them after a few; on matrices with real shared structure they keep going to ``iterations``.
    """

    group_size: int | dict[str, int] = 2
    diagonal: bool = True
    init: str = "alternating"
    iterations: int = 30
    tol: float = 1e-3

    def __post_init__(self) -> None:
        sizes = self.group_size if isinstance(self.group_size, dict) else {"default": self.group_size}
        for key, k in sizes.items():
            if not isinstance(key, str) or not _KEY.match(key):
                raise ValueError(f"residual group_size key {key!r} is not one of 'default', 'attention', 'ffn', "
                                 "'<component>' or '<component>.attention|ffn'")
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"residual group_size[{key!r}] must be a whole number >= 1, got {k!r}")
        if not isinstance(self.diagonal, bool):
            raise ValueError(f"residual diagonal must be True or False, got {self.diagonal!r}")
        if self.init not in INITS:
            hint = (" (the data-aware fit is chosen with FinetuneConfig(init='whiten') and calibration data: it "
                    "minimises the output error, starting as 'mean' or sweeping as 'alternating')"
                    if self.init == "whiten" else "")
            raise ValueError(f"residual init must be one of {INITS}, got {self.init!r}{hint}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"residual iterations must be a whole number >= 0, got {self.iterations!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 <= self.tol < 1:
            raise ValueError(f"residual tol must be a number in [0, 1), got {self.tol!r}")

    def size(self, component: str, kind: str) -> int:
        """K for one component's attention or FFN matrices."""
        if not isinstance(self.group_size, dict):
            return self.group_size
        for key in (f"{component}.{kind}", component, kind, "default"):
            if key in self.group_size:
                return self.group_size[key]
        return 2

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> ResidualConfig:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown residual options {unknown}; allowed: {sorted(known)}")
        return cls(**options)

    @classmethod
    def of(cls, config: Any, name: str = "residual") -> ResidualConfig:
        """The options a `CompressionConfig` gives the compressor registered as ``name``."""
        return cls.from_options(getattr(config, "method_options", {}).get(name))
