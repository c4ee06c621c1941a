"""Variable compression from one fine-tuning run: choose which layers stay compressed, without training.

After layer-wise fine-tuning every compressed layer has a measured relative output error (the report's
``error_after``) and a known number of parameters it saves. `select_layers` puts the layers that cost the
most error per parameter saved back to their original modules until a budget is met:

* ``keep_size``: at most this fraction of the original targeted (attention + FFN) parameters is kept.
  The spare size is spent greedily: layers are reverted in order of error per parameter saved, worst
  first, skipping any that would overflow the budget.
* ``max_error``: every layer whose error exceeds it is reverted (and no other, unless ``keep_size``
  leaves room).

Layers fine-tuned together because their modules share a parameter (a residual compressor group, reported
as ``"layer.0+layer.1"``) have one joint error, so they are chosen, and reverted, as one unit under that name.

Reverted modules are deep copies of the original model's, so a reverted layer computes exactly what the
original layer does; ``model.adaptwin_record`` drops their modules and accounting rows (save, load and
``adaptwin inspect`` see a model with fewer compressed sites) and ``record.finetune`` keeps every layer's
result, marked ``"reverted"``, with the choice under ``record.finetune["selection"]``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from adaptwin.compress import RECORD_ATTR, _submodule_setter, compression_record
from adaptwin.fusion import fuse_activations, unfuse_activations
from adaptwin.registry import get_architecture

SELECTION_ATTR = "adaptwin_selection"
# keep_size is compared with a ratio of integers; a budget equal to what a choice keeps must count as met
# even when keep_size * total rounds one ulp below it (0.55 * 100 = 55.000000000000007, 0.29 * 100 = 28.999...).
_TOLERANCE = 1e-9


@dataclass
class LayerChoice:
    """One fine-tuned layer: its error, what compressing it saves, and whether it is reverted."""

    path: str
    error: float  # relative output error after fine-tuning (held-out batches)
    params_before: int  # targeted parameters of the layer's compressed sites, dense
    params_after: int  # the same, compressed
    reverted: bool = False

    @property
    def saved(self) -> int:
        return self.params_before - self.params_after

    @property
    def error_per_param(self) -> float:
        """Error paid per parameter saved; a layer that saves nothing costs infinitely much."""
        return self.error / self.saved if self.saved > 0 else math.inf


@dataclass
class Selection:
    """Which layers were reverted to meet the budget, and the accounting before and after."""

    keep_size: float | None
    max_error: float | None
    layers: list[LayerChoice]  # every layer compressed before this selection, in model order
    reverted: list[str] = field(default_factory=list)  # in the order chosen
    params_original: int = 0  # targeted parameters of the original model (compressed + reverted layers)
    params_kept_before: int = 0  # kept before this selection (every candidate layer compressed)
    params_kept: int = 0  # kept after it

    @property
    def keep_fraction(self) -> float:
        return self.params_kept / self.params_original if self.params_original else 1.0

    @property
    def keep_fraction_before(self) -> float:
        return self.params_kept_before / self.params_original if self.params_original else 1.0

    @property
    def max_kept_error(self) -> float:
        """Worst error among the layers still compressed (0 when none is)."""
        return max((c.error for c in self.layers if not c.reverted), default=0.0)

    def table(self) -> str:
        lines = [f"{'layer':<34} {'rel. error':>10} {'params saved':>12} {'error/Mparam':>12}  status"]
        for c in self.layers:
            ratio = "inf" if math.isinf(c.error_per_param) else f"{1e6 * c.error_per_param:.4f}"
            lines.append(f"{c.path:<34} {c.error:>10.4f} {c.saved:>12,} {ratio:>12}  "
                         f"{'reverted' if c.reverted else 'compressed'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"keep_size": self.keep_size, "max_error": self.max_error, "reverted": list(self.reverted),
                "params_original": self.params_original, "params_kept_before": self.params_kept_before,
                "params_kept": self.params_kept, "keep_fraction": self.keep_fraction}


class BudgetConflictError(ValueError):
    """keep_size and max_error cannot both hold: known only once fine-tuning has measured the layers' errors."""


def check_budget(keep_size: float | None, max_error: float | None) -> None:
    """Refuse budgets that are not numbers in range (``keep_size`` in (0, 1], ``max_error`` >= 0)."""
    if keep_size is None and max_error is None:
        raise ValueError("give keep_size (max fraction of the targeted parameters to keep) and/or max_error "
                         "(max per-layer relative output error)")
    if keep_size is not None and (isinstance(keep_size, bool) or not isinstance(keep_size, (int, float))
                                  or not 0.0 < keep_size <= 1.0):
        raise ValueError(f"keep_size must lie in (0, 1] (fraction of the original targeted parameters to keep), "
                         f"got {keep_size!r}")
    if max_error is not None and (isinstance(max_error, bool) or not isinstance(max_error, (int, float))
                                  or not max_error >= 0.0):
        raise ValueError(f"max_error must be a number >= 0 (per-layer relative output error), got {max_error!r}")


def check_keep_size(keep_size: float, kept_fraction_all: float) -> None:
    """Refuse a ``keep_size`` below what keeping every layer compressed already achieves."""
    if kept_fraction_all >= 1.0 - _TOLERANCE:  # PQM: NF4 keeps every weight and LoRA adds some
        raise ValueError(
            f"keep_size budgets parameters, and compressing every layer keeps {kept_fraction_all:.4f} of them (the "
            "method saves bytes, not parameters: PQM stores every weight in NF4 and adds LoRA), so no keep_size "
            "can be met; select by error with max_error instead")
    if keep_size < kept_fraction_all - _TOLERANCE:
        raise ValueError(
            f"keep_size {keep_size:g} is below the {kept_fraction_all:.4f} of the targeted parameters kept "
            f"with every layer compressed; reverting layers only adds parameters, so nothing is reverted "
            f"(compress with a larger ratio, or use keep_size >= {kept_fraction_all:.4f})")


def _check_original(record: Any, original: nn.Module, adapter: Any) -> None:
    """Refuse an original whose layers are not those the model was compressed from (reverted layers are copied
    from it). Records written before 2026-11-26 hold no checksums and are not checked."""
    saved = record.finetune.get("original_layers")
    if not saved:
        return
    from adaptwin.compress import layer_checksums

    now = layer_checksums(original, adapter)
    for path, (count, total, squares) in saved.items():
        got = now.get(path)
        tol = 1e-9 * max(1.0, squares)  # float64 sums in another order differ by far less
        if got is None or got[0] != count or abs(got[1] - total) > tol or abs(got[2] - squares) > tol:
            raise ValueError(f"original's layer {path} is not the one this model was compressed from (its weights "
                             "differ); pass the very model given to compress, whose layers are copied back")


def _layer_choices(compressed: nn.Module, original: nn.Module) -> tuple[list[LayerChoice], dict[str, list[str]]]:
    from adaptwin.architectures import model_type_of

    record = compression_record(compressed)
    if getattr(original, RECORD_ATTR, None) is not None:
        raise ValueError("original must be the uncompressed model (it carries an adaptwin_record)")
    if model_type_of(original) != record.architecture:
        raise ValueError(f"original is a {model_type_of(original)!r} model, the compressed one "
                         f"{record.architecture!r}; pass the model it was compressed from")
    if not record.finetune or not record.finetune.get("layers"):
        raise ValueError("layers are chosen by their fine-tuning error: compress with calibration=... first "
                         "(this model has no per-layer fine-tuning results)")
    errors = {row["path"]: float(row["error_after"]) for row in record.finetune["layers"]}
    unit_of = {layer: unit for unit in errors for layer in unit.split("+")}  # a joint unit: "a+b" (shared weights)
    adapter = get_architecture(record.architecture)
    _check_original(record, original, adapter)
    choices: list[LayerChoice] = []
    modules: dict[str, list[str]] = {}
    for path, _ in adapter.layer_paths(original):
        mine = [m for m in record.modules if m.startswith(path + ".")]
        if not mine:
            continue  # never compressed, or reverted by an earlier selection
        unit = unit_of.get(path)
        if unit is None:
            raise ValueError(f"layer {path} is compressed but has no fine-tuning result to choose by (results "
                             f"exist for {sorted(errors)[:4]}); fine-tune it with calibration=... first")
        sites = [r for r in record.sites if r["path"].startswith(path + ".")]
        if unit not in modules:
            choices.append(LayerChoice(unit, errors[unit], 0, 0))
            modules[unit] = []
        choice = next(c for c in choices if c.path == unit)
        choice.params_before += sum(r["params_before"] for r in sites)
        choice.params_after += sum(r["params_after"] for r in sites)
        modules[unit] += mine
    for unit in modules:
        missing = [layer for layer in unit.split("+") if not any(m.startswith(layer + ".") for m in modules[unit])]
        if missing:
            raise ValueError(f"layers {unit.split('+')} were fine-tuned as one group '{unit}' (they share weights) "
                             f"and can only be kept or reverted together, but {missing} are no longer compressed")
    orphans = sorted(set(record.modules) - {m for ms in modules.values() for m in ms}
                     - {m for m, e in record.modules.items() if e["compressor"] == "quantized_embedding"})
    if orphans:
        raise ValueError(f"compressed modules {orphans[:3]} lie in no layer of the original model")
    return choices, modules


def plan_selection(compressed: nn.Module, original: nn.Module, *, keep_size: float | None = None,
                   max_error: float | None = None) -> Selection:
    """Decide which layers `select_layers` reverts, changing nothing. Same arguments and errors."""
    check_budget(keep_size, max_error)
    record = compression_record(compressed)
    choices, _ = _layer_choices(compressed, original)
    earlier = int((record.finetune.get("selection") or {}).get("reverted_params", 0))
    original_params = sum(c.params_before for c in choices) + earlier
    kept = sum(c.params_after for c in choices) + earlier
    sel = Selection(keep_size, max_error, choices, params_original=original_params, params_kept_before=kept)
    order = sorted(choices, key=lambda c: -c.error_per_param)  # stable: ties keep model order

    def revert(c: LayerChoice) -> None:
        nonlocal kept
        c.reverted = True
        sel.reverted.append(c.path)
        kept += c.saved

    if max_error is not None:
        for c in order:
            if c.error > max_error:
                revert(c)
    if keep_size is not None:
        budget = keep_size * original_params + _TOLERANCE * original_params
        if kept > budget:
            if not sel.reverted:
                check_keep_size(keep_size, kept / original_params)
            raise BudgetConflictError(
                f"the budgets conflict: reverting the {len(sel.reverted)} layer(s) whose error exceeds max_error "
                f"{max_error:g} keeps {kept / original_params:.4f} of the targeted parameters, above keep_size "
                f"{keep_size:g}; raise one of them")
        for c in order:
            if not c.reverted and kept + c.saved <= budget:
                revert(c)
    sel.params_kept = kept
    return sel


def select_layers(compressed: nn.Module, original: nn.Module, *, keep_size: float | None = None,
                  max_error: float | None = None, inplace: bool = False) -> nn.Module:
    """Revert fine-tuned layers to the original until a size or error budget is met (no training).

    Args:
        compressed: a model from ``adaptwin.compress(..., calibration=...)`` (or `adaptwin.load` of one).
        original: the uncompressed model it was compressed from; reverted modules are copies of its own.
        keep_size: at most this fraction, in (0, 1], of the original targeted parameters is kept;
            spare room is spent reverting the layers with the most error per parameter saved.
        max_error: every layer whose relative output error after fine-tuning exceeds this is reverted.
        inplace: change ``compressed`` itself instead of a deep copy.

    Returns:
        The model with the chosen layers reverted, its ``adaptwin_record`` updated, and
        ``model.adaptwin_selection``, the `Selection` made.

    Raises:
        ValueError: a budget out of range, a ``keep_size`` below what keeping every layer compressed
            achieves (nothing is reverted), budgets that conflict, or a model without fine-tuning results.
    """
    selection = plan_selection(compressed, original, keep_size=keep_size, max_error=max_error)
    _, modules = _layer_choices(compressed, original)
    model = compressed if inplace else copy.deepcopy(compressed)
    # a reverted linear that ran its layer's activation (fuse_activations) must take it back with it
    fused = bool(unfuse_activations(model))
    record = compression_record(model)
    for layer in selection.reverted:
        for path in modules[layer]:
            fresh = copy.deepcopy(original.get_submodule(path))
            ref = next(model.get_submodule(path).parameters(), None)
            if ref is not None:  # follow a compressed model that was moved (GPU) or cast (bf16) since
                fresh.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            _submodule_setter(model, path, fresh.train(model.training))
            del record.modules[path]
    reverted = {layer for unit in selection.reverted for layer in unit.split("+")}  # a group's every layer
    record.sites = [r for r in record.sites if not any(r["path"].startswith(p + ".") for p in reverted)]
    earlier = dict(record.finetune.get("selection") or {})
    all_reverted = [*earlier.get("reverted", []), *selection.reverted]
    record.finetune = {
        **record.finetune,
        "layers": [{**row, "reverted": row["path"] in all_reverted} for row in record.finetune["layers"]],
        "selection": {**selection.to_dict(), "reverted": all_reverted,
                      "reverted_params": selection.params_original - sum(c.params_before for c in selection.layers
                                                                         if not c.reverted)},
    }
    setattr(model, SELECTION_ATTR, selection)
    if fused:
        fuse_activations(model)  # the layers still compressed run fused again
    return model
