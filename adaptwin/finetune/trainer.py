"""Train one compressed layer alone to reproduce the original layer's output (Eq. 9), with Adam.

The layer runs in eval mode (no dropout: the target is the deterministic original output) with
gradients on its compressed modules only; LayerNorms and anything left dense stay frozen. A held-out
slice of the calibration batches picks the best epoch (early stopping).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adaptwin.finetune.capture import ActivationStore, first_output


@dataclass
class LayerResult:
    path: str
    error_before: float  # held-out relative output error ‖T'(X) − Y‖ / ‖Y‖ before training
    error_after: float
    train_loss: float  # last epoch's mean training MSE
    epochs: int  # epochs run (early stopping may end sooner)
    best_epoch: int
    seconds: float
    flops: float  # forward + backward FLOPs of the trainable matmuls (3x forward), for throughput

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def layer_seed(seed: int, path: str) -> int:
    """Each layer's own seed: results do not depend on which layers ran before or on which rank."""
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % (2**31)


def _rel_error(layer: nn.Module, store: ActivationStore, path: str, ids: list[int]) -> float:
    num = den = 0.0
    with torch.no_grad():
        for b in ids:
            args, kwargs, target = store.get(path, b)
            out = first_output(layer(*args, **kwargs))
            num += (out.float() - target.float()).pow(2).sum().item()
            den += target.float().pow(2).sum().item()
    return (num / den) ** 0.5 if den > 0 else 0.0


def _count_flops(layer: nn.Module, args: tuple, kwargs: dict) -> float:
    """Forward matmul FLOPs of one call (2 per multiply-add), counted with the dispatcher's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(*args, **kwargs)
    return float(counter.get_total_flops())


def train_layer(
    layer: nn.Module,
    path: str,
    store: ActivationStore,
    train_ids: list[int],
    val_ids: list[int],
    masks: dict[str, torch.Tensor | None],
    *,
    epochs: int,
    lr: float,
    patience: int,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> LayerResult:
    """Fine-tune ``layer`` in place on its captured calls.

    Args:
        layer: the compressed layer (a module of the compressed model).
        path: its name in the store.
        train_ids, val_ids: calibration batch indices to train on and to select the best epoch with
            (``val_ids`` empty: the last epoch is kept).
        masks: trainable parameter name (relative to ``layer``) -> None (all entries trainable) or a
            bool mask of the entries that may change (the others get zero gradient, so Adam leaves them).
        on_epoch: called with (epoch, mean training loss) after each epoch (progress bars).
    """
    start = time.perf_counter()
    params = dict(layer.named_parameters())
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"{path}: no parameters named {unknown[:3]} to train")
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    trainable = []
    hooks = []
    for name, p in params.items():
        p.requires_grad_(name in masks)
        if name in masks:
            trainable.append(p)
            if masks[name] is not None:
                keep = masks[name].to(p.device, p.dtype)
                hooks.append(p.register_hook(lambda g, keep=keep: g * keep))
    was_training = layer.training
    layer.eval()
    eval_ids = val_ids or train_ids
    error_before = _rel_error(layer, store, path, eval_ids)
    best = (error_before, 0, {n: p.detach().clone() for n, p in params.items() if n in masks})
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(trainable, lr=lr)
    args0, kwargs0, _ = store.get(path, train_ids[0])
    flops_per_call = _count_flops(layer, args0, kwargs0) if trainable else 0.0
    calls = 0
    train_loss, epoch, stale = float("nan"), 0, 0
    try:
        for epoch in range(1, epochs + 1 if trainable else 1):
            total = 0.0
            for i in torch.randperm(len(train_ids), generator=gen).tolist():
                args, kwargs, target = store.get(path, train_ids[i])
                out = first_output(layer(*args, **kwargs))
                loss = torch.nn.functional.mse_loss(out, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                calls += 1
            train_loss = total / len(train_ids)
            err = _rel_error(layer, store, path, eval_ids)
            if err < best[0]:
                best, stale = (err, epoch, {n: p.detach().clone() for n, p in params.items() if n in masks}), 0
            else:
                stale += 1
            if on_epoch is not None:
                on_epoch(epoch, train_loss)
            if patience and val_ids and stale >= patience:
                break
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, value in best[2].items():
                params[n].copy_(value)
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])
        layer.train(was_training)
    return LayerResult(path, error_before, best[0], train_loss, epoch, best[1],
                       time.perf_counter() - start, 3.0 * flops_per_call * calls)
