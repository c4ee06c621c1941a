"""Second moments of each site's inputs, for data-aware (whitened) initialisation.

For every site the Gram matrix of its homogeneous input x̃ = [x, 1] is accumulated in float64 over all
calibration tokens: G = Σ x̃·x̃ᵀ, (d+1)×(d+1). Attention sites get one for the query input (``"x"``) and
one for the key/value input (``"kv"``, the encoder states in cross-attention, else the same as ``"x"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from adaptwin.finetune.capture import run_model


def _gram(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1, x.shape[-1]).double()  # (N, d)
    flat = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], 1)  # (N, d+1)
    return flat.T @ flat


def collect_stats(model: nn.Module, sites: list[Any], batches: Iterable[Any],
                  run: Callable[[nn.Module, Any], Any] = run_model) -> dict[str, dict[str, torch.Tensor]]:
    """``{site.path: {"x": G_x, "kv": G_kv (attention only), "n": tokens}}`` over ``batches``."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    handles = []

    def add(path: str, key: str, x: torch.Tensor) -> None:
        entry = stats.setdefault(path, {})
        g = _gram(x)
        entry[key] = entry[key] + g if key in entry else g

    for site in sites:
        module = model.get_submodule(site.path)
        is_attention = hasattr(site, "num_heads")

        def hook(mod, args, kwargs, path=site.path, attention=is_attention):
            x = args[0] if args else kwargs["hidden_states"]
            add(path, "x", x)
            if attention:
                kv = next((v for k, v in kwargs.items() if k in ("key_value_states", "encoder_hidden_states")
                           and isinstance(v, torch.Tensor)), None)
                add(path, "kv", x if kv is None else kv)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [s.path for s in sites if s.path not in stats]
    if missing:
        raise ValueError(f"calibration never reached {missing[:3]}; cannot whiten their factorisation")
    return stats
