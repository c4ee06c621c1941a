"""Train one compressed layer alone to reproduce the original layer's output (Eq. 9), with Adam.

The layer runs in eval mode (no dropout: the target is the deterministic original output) with
gradients on its compressed modules only; LayerNorms and anything left dense stay frozen. A held-out
slice of the calibration batches picks the best epoch (early stopping).

Padding tokens are left out of the loss and of the reported error when the calibration batch says which
they are (see `token_masks`): padded keys are masked out of every score and padded positions' outputs are
discarded downstream, so fitting them spends the factors' capacity on values nothing reads.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import adaptwin.ops  # noqa: F401 - declares torch.ops.adaptwin.* (counted below)
from adaptwin.finetune.capture import ActivationStore, first_output, frame_mask


@dataclass
class LayerResult:
    path: str
    error_before: float  # held-out relative output error ‖T'(X) − Y‖ / ‖Y‖ before training
    error_after: float
    train_loss: float  # last epoch's mean training MSE
    epochs: int  # epochs run (early stopping may end sooner)
    best_epoch: int
    seconds: float  # wall time of training and evaluation (FLOP counting and on_epoch callbacks excluded)
    flops: float  # FLOPs executed: forward + backward of every step, forward of every evaluation

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def layer_seed(seed: int, path: str) -> int:
    """Each layer's own seed: results do not depend on which layers ran before or on which rank."""
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % (2**31)


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _adaptwin_attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """``adaptwin::attention`` (the rank-space attention op that evaluation forwards run): q·kᵀ and p·v.
    FlopCounterMode passes the tensors' shapes."""
    b, h, t, dq = q
    return 2 * b * h * t * k[-2] * (dq + v[-1])


# torch's FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel SDPA runs on
# CPU, nor adaptwin's own attention op; without these, a Whisper-tiny encoder layer at T = 1500 reports
# 7.2 of its 14.7 GFLOP per step.
_EXTRA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
    torch.ops.adaptwin.attention: _adaptwin_attention_flops,
}


def _signature(obj: Any) -> Any:
    """What a call's FLOP count depends on: shapes and dtypes of its tensors, the other values as is."""
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape), obj.dtype)
    if isinstance(obj, (tuple, list)):
        return tuple(_signature(x) for x in obj)
    if isinstance(obj, dict):
        return tuple((k, _signature(v)) for k, v in obj.items())
    return repr(obj)


class _FlopCounter:
    """FLOPs per call of ``layer``, counted once per distinct input signature (shapes), with backward or not."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer, self.cache, self.seconds = layer, {}, 0.0

    def __call__(self, args: tuple, kwargs: dict, target: torch.Tensor | None) -> float:
        key = (_signature((args, kwargs)), target is not None)
        if key not in self.cache:
            start = time.perf_counter()
            with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
                if target is None:
                    with torch.no_grad():
                        self.layer(*args, **kwargs)
                else:
                    F.mse_loss(first_output(self.layer(*args, **kwargs)), target).backward()
            for p in self.layer.parameters():  # the counting backward's gradients are not a step's
                p.grad = None
            self.cache[key] = float(counter.get_total_flops())
            self.seconds += time.perf_counter() - start
        return self.cache[key]


def token_masks(batches: list[Any], component: str, model: nn.Module | None = None) -> list[list[torch.Tensor]]:
    """Per calibration batch, the masks that may say which of a layer's positions are real tokens.

    From a dict batch: ``attention_mask``, and first ``decoder_attention_mask`` for a decoder layer of an
    encoder-decoder model; with ``model`` an audio encoder, also its frame mask (`frame_mask`: wav2vec2's
    ``attention_mask`` marks samples, its layers see frames). `train_layer` uses the first one shaped like
    the layer output's (B, T); none matches for inputs that are not tokens (Whisper's mel frames), and then
    every position counts.
    """
    keys = ("decoder_attention_mask", "attention_mask") if component == "decoder" else ("attention_mask",)
    out = []
    for b in batches:
        masks = [b[k] for k in keys if isinstance(b, dict) and isinstance(b.get(k), torch.Tensor) and b[k].ndim == 2]
        frames = frame_mask(model, b) if model is not None else None
        out.append(masks + ([frames] if frames is not None else []))
    return out


def _weights(target: torch.Tensor, candidates: list[torch.Tensor] | None) -> torch.Tensor | None:
    """(B, T, 1) 0/1 weights of the real tokens of ``target`` (B, T, ...), or None when all count."""
    for m in candidates or ():
        if target.ndim >= 3 and tuple(m.shape) == tuple(target.shape[:2]):
            if bool((m != 0).all()):
                return None
            return (m != 0).to(target.dtype).to(target.device).reshape(*m.shape, *[1] * (target.ndim - 2))
    return None


def _masked_mse(out: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return F.mse_loss(out, target)
    per_token = target[0, 0].numel() if target.ndim >= 3 else 1
    return ((out - target).pow(2) * w).sum() / (w.sum() * per_token).clamp(min=1)


def _rel_error(layer: nn.Module, store: ActivationStore, path: str, ids: list[int],
               count: _FlopCounter, masks: list[list[torch.Tensor]] | None = None) -> tuple[float, float]:
    """Relative output error over ``ids`` (real tokens only) and the FLOPs spent; one host sync, at the end."""
    num = den = 0.0
    flops = 0.0
    for b in ids:
        args, kwargs, target = store.get(path, b)
        flops += count(args, kwargs, None)
        w = _weights(target, masks[b] if masks else None)
        with torch.inference_mode():
            out = first_output(layer(*args, **kwargs))
            err, ref = (out.double() - target.double()).pow(2), target.double().pow(2)
            if w is not None:
                err, ref = err * w, ref * w
            num = num + err.sum()  # stays on the layer's device
            den = den + ref.sum()
    num, den = float(num), float(den)
    return ((num / den) ** 0.5 if den > 0 else 0.0), flops


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
    token_masks: list[list[torch.Tensor]] | None = None,
) -> LayerResult:
    """Fine-tune ``layer`` in place on its captured calls; it ends at its best evaluated epoch.

    Args:
        layer: the compressed layer (a module of the compressed model).
        path: its name in the store.
        train_ids, val_ids: calibration batch indices to train on and to select the best epoch with.
            With ``val_ids`` empty the training batches are evaluated instead and ``patience`` does not
            stop early (a training error says nothing about overfitting).
        masks: trainable parameter name (relative to ``layer``) -> None (all entries trainable) or a
            bool mask of the entries that may change (the others get zero gradient, so Adam leaves them
            bit-identical: its moments stay 0 and the update is 0 / (0 + eps)).
        patience: epochs without improvement of the evaluated error before stopping; 0 disables.
        seed: seeds the shuffling (and torch's global generator, restored afterwards).
        on_epoch: called with (epoch, mean training loss) after each epoch (progress bars).
        token_masks: per batch index, candidate token masks (see `token_masks`); positions they mark as
            padding are left out of the loss and the error. None: every position counts.
    """
    if not train_ids:
        raise ValueError(f"{path}: no training batches (all calibration batches are held out)")
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
    count = _FlopCounter(layer)
    cuda = sorted({p.device.index or 0 for p in trainable if p.is_cuda})
    best = None
    outside = 0.0
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)  # nothing in an eval-mode layer should draw, but if it does: reproducibly
            error_before, flops = _rel_error(layer, store, path, eval_ids, count, token_masks)
            best = (error_before, 0, {n: p.detach().clone() for n, p in params.items() if n in masks})
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(trainable, lr=lr) if trainable else None
            train_loss, epoch, stale = float("nan"), 0, 0
            for epoch in range(1, epochs + 1 if trainable else 1):
                total = torch.zeros((), dtype=torch.float64)  # summed on device: no sync per step
                for i in torch.randperm(len(train_ids), generator=gen).tolist():
                    args, kwargs, target = store.get(path, train_ids[i])
                    flops += count(args, kwargs, target)
                    out = first_output(layer(*args, **kwargs))
                    w = _weights(target, token_masks[train_ids[i]] if token_masks else None)
                    loss = _masked_mse(out, target, w)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total = total.to(loss.device) + loss.detach()
                train_loss = total.item() / len(train_ids)
                err, spent = _rel_error(layer, store, path, eval_ids, count, token_masks)
                flops += spent
                if err < best[0]:
                    best, stale = (err, epoch, {n: p.detach().clone() for n, p in params.items() if n in masks}), 0
                else:
                    stale += 1
                if on_epoch is not None:
                    tick = time.perf_counter()
                    on_epoch(epoch, train_loss)
                    outside += time.perf_counter() - tick  # progress bars are not training time
                if patience and val_ids and stale >= patience:
                    break
    finally:
        for h in hooks:
            h.remove()
        if best is not None:
            with torch.no_grad():
                for n, value in best[2].items():
                    params[n].copy_(value)
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])
            p.grad = None
        layer.train(was_training)
    seconds = time.perf_counter() - start - count.seconds - outside
    return LayerResult(path, error_before, best[0], train_loss, epoch, best[1], seconds, flops)
