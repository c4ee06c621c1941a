"""Speaker adaptation: train only the LoRA factors of a PQM model end to end with the model's own loss.

    small = adaptwin.compressors.pqm.quantize(model, lora_rank=4)      # NF4 base + zero-started LoRA
    report = adaptwin.adapt(small, batches, epochs=10, lr=1e-3)         # batches: dicts for model(**batch)

Each batch is a dict of model inputs that includes the labels, so ``model(**batch).loss`` is the model's
own training loss (Whisper: ``{"input_features", "labels"}``, token cross-entropy). Optional LoRA
pre-training on multi-speaker data (PQM's second stage) is the same call on other batches.

With ``eval_batches`` (held-out utterances of the same speaker) the loss on them is measured before training
and after every epoch, and the LoRA factors of the best epoch are restored at the end; epoch 0 (no
adaptation) is a candidate, so adapting on 20-30 utterances never leaves the model worse on held-out data
than it started. ``patience`` stops after that many epochs without a new best.

Determinism: the model stays in eval mode (no dropout), the batch order is shuffled from ``seed`` with a
private generator, and the global RNG is left as it was; on CPU the same call gives the same factors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from adaptwin.compressors.pqm.layer import NF4LoRALinear


@dataclass
class AdaptReport:
    """What adaptation did: the mean loss over the batches before and after, and per epoch while training."""

    loss_before: float
    loss_after: float
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    trainable_params: int = 0
    seconds: float = 0.0
    eval_losses: list[float] = field(default_factory=list)  # held-out loss before training, then per epoch
    best_epoch: int | None = None  # the epoch whose factors were kept (0: none, the model as it came)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors of every PQM module of ``model`` (raises if it has none)."""
    params = [p for m in model.modules() if isinstance(m, NF4LoRALinear) for p in (m.lora_A, m.lora_B)]
    if not params:
        raise ValueError("this model has no PQM modules to adapt; quantise it first with "
                         "adaptwin.compressors.pqm.quantize(model, lora_rank=...) (or `adaptwin adapt` on a dense "
                         "model folder)")
    return params


def _check(epochs: int, lr: float, batches: list) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a whole number >= 1, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if not batches:
        raise ValueError("no batches to adapt on")
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping):
            raise ValueError(f"batch {i} is a {type(b).__name__}; each batch must be a dict of model inputs "
                             "including the labels (passed as model(**batch))")


def _loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(f"model(**batch) returned no loss; include the labels in every batch (keys given: "
                         f"{sorted(batch)})")
    return loss


def _mean_loss(model: nn.Module, batches: list) -> float:
    with torch.no_grad():
        return sum(float(_loss(model, b)) for b in batches) / len(batches)


def adapt(model: nn.Module, batches: Iterable[Mapping[str, Any]], *, epochs: int = 10, lr: float = 1e-3,
          seed: int = 0, shuffle: bool = True, max_grad_norm: float | None = 1.0,
          progress: Callable[[int, int, float], None] | None = None,
          eval_batches: Iterable[Mapping[str, Any]] | None = None, patience: int | None = None,
          about: Mapping[str, Any] | None = None) -> AdaptReport:
    """Train the LoRA factors of ``model``'s PQM modules on ``batches`` with Adam; everything else stays frozen.

    Args:
        model: a model with PQM modules (`quantize`, or `adaptwin.load` of a PQM save); changed in place.
        batches: dicts of model inputs with labels; ``model(**batch).loss`` is minimised (its mean).
        epochs: passes over the batches; lr: Adam's learning rate; seed: the shuffling order.
        shuffle: visit the batches in a new seeded order each epoch (else in the given order).
        max_grad_norm: clip the LoRA gradients' global norm to this (None: no clipping).
        progress: called as ``progress(epoch, epochs, mean training loss)`` after every epoch.
        eval_batches: held-out batches (same form); when given, the factors of the epoch with the lowest mean
            loss on them (epoch 0 = before training included) are restored at the end.
        patience: with ``eval_batches``, stop after this many epochs without a new best (None: run all).
        about: JSON-able facts about the data (speaker, data set, utterances), recorded with the run.

    Returns:
        An `AdaptReport`; it is also kept as ``model.adaptwin_adapt``, and a model compressed by adaptwin appends
        the run (settings, losses, kept epoch, ``about``) to its record's ``adaptations``, which `save` writes.
    """
    if about is not None and not isinstance(about, Mapping):
        raise ValueError(f"about must be a mapping of JSON-able facts, got {type(about).__name__}")
    batches = list(batches)
    _check(epochs, lr, batches)
    held = list(eval_batches) if eval_batches is not None else None
    if held is not None:
        if not held:
            raise ValueError("eval_batches is empty; pass None to adapt without held-out selection")
        _check(1, 1.0, held)
    if patience is not None and (held is None or isinstance(patience, bool) or not isinstance(patience, int)
                                 or patience < 1):
        raise ValueError(f"patience must be a whole number >= 1 and needs eval_batches, got {patience!r}"
                         f"{'' if held is not None else ' without eval_batches'}")
    params = lora_parameters(model)
    trainable = {id(p) for p in params}
    was_training = model.training
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    t0 = time.perf_counter()
    try:
        for p, _ in saved_flags:
            p.requires_grad_(id(p) in trainable)
        model.eval()  # dropout off: adaptation on 20-30 utterances is deterministic and reproducible
        before = _mean_loss(model, batches)
        eval_losses: list[float] = []
        best_epoch, best_state = None, None
        if held is not None:
            eval_losses.append(_mean_loss(model, held))
            best_epoch, best_state = 0, [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=float(lr))
        gen = torch.Generator().manual_seed(int(seed))
        epoch_losses, steps = [], 0
        for epoch in range(epochs):
            order = torch.randperm(len(batches), generator=gen).tolist() if shuffle else range(len(batches))
            total = 0.0
            for i in order:
                loss = _loss(model, batches[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                total += float(loss.detach())
                steps += 1
            epoch_losses.append(total / len(batches))
            if progress is not None:
                progress(epoch + 1, epochs, epoch_losses[-1])
            if held is not None:
                eval_losses.append(_mean_loss(model, held))
                if eval_losses[-1] < eval_losses[best_epoch]:
                    best_epoch, best_state = epoch + 1, [p.detach().clone() for p in params]
                elif patience is not None and epoch + 1 - best_epoch >= patience:
                    break
        if best_state is not None:
            with torch.no_grad():
                for p, v in zip(params, best_state):
                    p.copy_(v)
        after = _mean_loss(model, batches)
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    report = AdaptReport(before, after, epoch_losses, steps, sum(p.numel() for p in params),
                         time.perf_counter() - t0, eval_losses, best_epoch)
    model.adaptwin_adapt = report
    record = getattr(model, "adaptwin_record", None)  # (the attribute compress and load set: RECORD_ATTR)
    if record is not None and isinstance(getattr(record, "adaptations", None), list):
        record.adaptations.append({
            "epochs": epochs, "lr": float(lr), "seed": int(seed), "batches": len(batches),
            "held_out_batches": len(held) if held is not None else 0, "steps": steps,
            "loss_before": before, "loss_after": after, "eval_losses": eval_losses, "best_epoch": best_epoch,
            **dict(about or {})})
    return report
