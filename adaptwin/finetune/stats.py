"""Second moments of each site's inputs, for data-aware (whitened) initialisation.

For every site the Gram matrix of its homogeneous input x̃ = [x, 1] is accumulated in float64 over all
calibration tokens: G = Σ x̃·x̃ᵀ, (d+1)×(d+1) (so ``G[-1, -1]`` is the token count and ``G[:-1, -1]``
the sum of the inputs). Attention sites get one for the query input (``"x"``) and one for the
key/value input (``"kv"``, the encoder states in cross-attention, else the same as ``"x"``) and one for
the output projection's input (``"o"``, (H·d_h+1)×(H·d_h+1): the attention-mixed values, which weight
the VO twin's error).

Padding tokens are left out when the batch says which they are: a dict batch with a mask shaped like
the input's tokens (B, T) - ``attention_mask``, or first ``decoder_attention_mask`` for decoder sites
of an encoder-decoder model, and ``attention_mask`` for cross-attention's encoder states. Padded keys
are masked out of every score and padded queries' outputs are discarded, so weighting the error on
them would spend rank on positions no output depends on (21 % of the tokens of MiniLM calibration
batches of 16 unsorted sentences).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from adaptwin.finetune.capture import frame_mask, run_model


def _gram(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ x̃x̃ᵀ over the tokens of ``x`` (..., d) where ``mask`` (x.shape[:-1]) is nonzero; (d+1, d+1) float64."""
    flat = x.detach().reshape(-1, x.shape[-1]).double()  # (N, d)
    if mask is not None:
        flat = flat[mask.reshape(-1).to(flat.device) != 0]
    flat = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], 1)  # (N, d+1)
    return flat.T @ flat


def _token_mask(batch: Any, x: torch.Tensor, keys: tuple[str, ...], frames: torch.Tensor | None = None
                ) -> torch.Tensor | None:
    """The first of the batch's masks named ``keys``, then ``frames`` (an audio encoder's `frame_mask`), shaped
    like ``x``'s tokens (B, T), else None."""
    if not isinstance(batch, dict) or x.dim() != 3:
        return None
    for mask in [batch.get(key) for key in keys] + [frames]:
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(x.shape[:2]):
            return mask
    return None  # no mask, or one of another sequence (raw audio samples, the other stack's tokens)


def output_module(model: nn.Module, site: Any) -> nn.Module:
    """The module holding an attention site's output projection (found by its weight's storage)."""
    root = site.out_path or site.path
    ptr = site.o.weight.data_ptr()
    for module in model.get_submodule(root).modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.data_ptr() == ptr and weight.numel() == site.o.weight.numel():
            return module
    raise ValueError(f"{site.path}: no module under {root} holds the output projection's weight")


def collect_stats(model: nn.Module, sites: list[Any], batches: Iterable[Any],
                  run: Callable[[nn.Module, Any], Any] = run_model) -> dict[str, dict[str, torch.Tensor]]:
    """``{site.path: {"x": G_x, "kv": G_kv, "o": G_o (attention sites only)}}`` over ``batches``, float64.

    Args:
        model: the original model (not modified); sites: its `AttentionSite`/`LinearSite` records.
        batches: calibration batches, run as ``run(model, batch)``.

    Raises:
        ValueError: a site never ran, or ran on no unmasked token.
    """
    stats: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    current: dict[str, Any] = {"batch": None, "frames": None}

    def add(path: str, key: str, g: torch.Tensor) -> None:
        entry = stats.setdefault(path, {})
        entry[key] = entry[key] + g if key in entry else g

    for site in sites:
        module = model.get_submodule(site.path)
        is_attention = hasattr(site, "num_heads")
        own = ("decoder_attention_mask", "attention_mask") if site.component == "decoder" else ("attention_mask",)

        def hook(mod, args, kwargs, path=site.path, attention=is_attention, own=own):
            x = args[0] if args else kwargs["hidden_states"]
            g = _gram(x, _token_mask(current["batch"], x, own, current["frames"]))
            add(path, "x", g)
            if attention:
                kv = next((v for k, v in kwargs.items() if k in ("key_value_states", "encoder_hidden_states")
                           and isinstance(v, torch.Tensor)), None)
                add(path, "kv", g if kv is None else _gram(kv, _token_mask(current["batch"], kv, ("attention_mask",))))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        if is_attention:
            def out_hook(mod, args, path=site.path, own=own):
                add(path, "o", _gram(args[0], _token_mask(current["batch"], args[0], own, current["frames"])))

            handles.append(output_module(model, site).register_forward_pre_hook(out_hook))
    training = model.training
    model.eval()  # as capture: statistics of the model as it runs in use, without dropout
    try:
        with torch.no_grad():
            for batch in batches:
                current["batch"], current["frames"] = batch, frame_mask(model, batch)
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    missing = [s.path for s in sites if s.path not in stats or not stats[s.path]["x"][-1, -1] > 0]
    if missing:
        raise ValueError(f"calibration never reached {missing[:3]}; cannot whiten their factorisation")
    return stats
