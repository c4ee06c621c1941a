"""Layer-wise fine-tuning of a compressed model against its original: capture, train, checkpoint, resume.

Independent mode (the paper's) trains every layer on the original model's inputs, so layers are
independent and can be spread over torch.distributed ranks (``torchrun --nproc-per-node N``; gloo on
CPU, NCCL on GPUs): rank r trains layers r, r+N, ... and every rank assembles all of them from the
run directory. Sequential mode trains layer i on the outputs of the already trained layers before it.
Layers whose compressed modules share a parameter (the residual compressor's per-group matrix) are
trained together as one unit, on the sum of their losses, each on its own captured call; the shared tensor
gets the gradients of all of them. Each finished layer (or group) is written atomically to ``run_dir``; a
rerun of the same command skips it, and because every layer has its own seed a killed-and-resumed run
ends with the same weights (bit for bit on CPU; tests/test_resume.py kills runs with SIGKILL to check).
``run_dir/run.json`` fingerprints what the weights depend on - the original's weights, the calibration
data, the compression and fine-tuning settings - and a run directory of any other run is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from adaptwin._files import remove_dead_temps, temp_prefix
from adaptwin.compress import compression_record, layer_checksums
from adaptwin.finetune.capture import ActivationStore, capture, first_output, run_model
from adaptwin.finetune.checkpoint import (
    check_run,
    check_run_dir,
    data_digest,
    remove_stale,
    safe_name,
    weights_digest,
    write_atomic,
)
from adaptwin.finetune.config import FinetuneConfig
from adaptwin.finetune.trainer import LayerResult, layer_seed, token_masks, train_layer
from adaptwin.registry import get_architecture, get_compressor


@dataclass
class FinetuneReport:
    layers: list[LayerResult] = field(default_factory=list)
    capture_bytes: int = 0  # peak bytes of captured activations held (memory or disk)
    resumed: list[str] = field(default_factory=list)  # layers loaded from run_dir checkpoints

    def table(self) -> str:
        lines = [f"{'layer':<34} {'rel. error before':>17} {'after':>8} {'epochs':>6} {'seconds':>8}"]
        for r in self.layers:
            tag = " (resumed)" if r.path in self.resumed else ""
            lines.append(f"{r.path:<34} {r.error_before:>17.4f} {r.error_after:>8.4f} {r.epochs:>6} "
                         f"{r.seconds:>8.1f}{tag}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [r.to_dict() for r in self.layers], "capture_bytes": self.capture_bytes,
                "resumed": self.resumed}


def _dist_info() -> tuple[int, int]:
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _layer_masks(compressed: nn.Module, layer_path: str, mode: str) -> dict[str, torch.Tensor | None]:
    """Trainable parameters of one layer: its compressed modules' (LoRA entries only for ``lora_only``)."""
    record = compression_record(compressed)
    masks: dict[str, torch.Tensor | None] = {}
    for mpath, entry in record.modules.items():
        if not mpath.startswith(layer_path + "."):
            continue
        module = compressed.get_submodule(mpath)
        rel = mpath[len(layer_path) + 1:]
        if mode == "lora_only":
            for name, mask in get_compressor(entry["compressor"]).lora_mask(module, entry["spec"]).items():
                if mask is not None and bool(mask.any()):
                    masks[f"{rel}.{name}"] = mask
        else:
            masks.update({f"{rel}.{name}": None for name, _ in module.named_parameters()})
    return masks


class _Group(nn.Module):
    """Layers that share parameters, trained as one.

    Called with each member's captured call ``(args, kwargs)``, it returns the members' outputs
    concatenated on the batch dimension. Against the concatenated targets the mean squared error is the
    members' summed error over the group's token count (the same equal-size sum up to 1/K, which Adam
    ignores), and the relative error `train_layer` reports is the group's.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(layers)
        self.training = all(m.training for m in layers)  # train_layer restores this mode on the members

    def forward(self, *calls: tuple[tuple, dict]) -> torch.Tensor:
        return torch.cat([first_output(m(*a, **k)) for m, (a, k) in zip(self.members, calls)], 0)  # (K·B, T, d)


class _GroupStore:
    """A view of an `ActivationStore` serving a `_Group`: per batch, every member's call and their targets."""

    def __init__(self, store: ActivationStore, paths: list[str]) -> None:
        self.store, self.paths = store, paths

    def get(self, name: str, batch: int) -> tuple[tuple, dict, torch.Tensor]:
        calls, targets = [], []
        for path in self.paths:
            args, kwargs, target = self.store.get(path, batch)
            calls.append((args, kwargs))
            targets.append(target)
        return tuple(calls), {}, torch.cat(targets, 0)


def _shared_groups(compressed: nn.Module, layers: list[str]) -> list[list[str]]:
    """``layers`` partitioned into groups of layers whose compressed modules share a parameter, in order."""
    root = list(range(len(layers)))

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    seen: dict[int, int] = {}
    for i, path in enumerate(layers):
        layer = compressed.get_submodule(path)
        for name in _layer_masks(compressed, path, "all"):
            key = id(layer.get_parameter(name))
            if key in seen:
                root[find(i)] = find(seen[key])
            else:
                seen[key] = i
    groups: dict[int, list[str]] = {}
    for i, path in enumerate(layers):
        groups.setdefault(find(i), []).append(path)
    return sorted(groups.values(), key=lambda g: layers.index(g[0]))


def _group_masks(group: _Group, member_masks: list[dict[str, torch.Tensor | None]]) -> dict[str, torch.Tensor | None]:
    """The members' trainable masks under the group's parameter names (a shared parameter named once)."""
    names = {id(p): n for n, p in group.named_parameters()}
    out: dict[str, torch.Tensor | None] = {}
    for member, masks in zip(group.members, member_masks):
        for name, mask in masks.items():
            key = names[id(member.get_parameter(name))]
            if key in out:
                out[key] = None if out[key] is None or mask is None else out[key] | mask
            else:
                out[key] = mask
    return out


def finetune(
    original: nn.Module,
    compressed: nn.Module,
    calibration: Iterable[Any],
    config: FinetuneConfig | None = None,
    *,
    run: Callable[[nn.Module, Any], Any] = run_model,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> FinetuneReport:
    """Train each compressed layer of ``compressed`` to reproduce ``original``'s layer (in place), and record the
    run in its ``adaptwin_record.finetune`` (replacing an earlier run's), as `compress` with calibration does.

    Args:
        original: the uncompressed model (not modified).
        compressed: its compressed copy from `adaptwin.compress`.
        calibration: batches; each is passed as ``model(**batch)`` (dicts) or ``model(batch)``.
        config: epochs, learning rate, ablation mode, storage, run directory...
        run: how to run a model on one batch (default: the above, with ``use_cache=False``).
        progress: called as ``progress(layer, epoch, epochs, loss)`` after every epoch.
    """
    cfg = config or FinetuneConfig()
    record = compression_record(compressed)
    adapter = get_architecture(record.architecture)
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration data is empty: give at least one batch")
    components = {p: c for p, c in adapter.layer_paths(original)
                  if any(m.startswith(p + ".") for m in record.modules)}
    layers = list(components)
    units = {"+".join(g): g for g in _shared_groups(compressed, layers)}  # trained together: shared parameters
    joint = [u for u, g in units.items() if len(g) > 1]
    if joint and cfg.sequential:
        raise ValueError(f"sequential fine-tuning trains one layer at a time, but {joint[0]} share parameters "
                         "(residual groups) and must be trained together; use sequential=False")
    n_val = max(1, round(cfg.holdout * len(batches))) if cfg.holdout > 0 and len(batches) >= 2 else 0
    n_val = min(n_val, len(batches) - 1)  # keep at least one batch to train on (holdout=0.9 of 2 batches)
    train_ids, val_ids = list(range(len(batches) - n_val)), list(range(len(batches) - n_val, len(batches)))

    rank, world = _dist_info()
    if world > 1 and cfg.sequential:
        raise ValueError("sequential mode trains layers one after another; run it in one process, not torchrun")
    if rank == 0 and cfg.storage == "disk" and Path(cfg.storage_dir).is_dir():
        for leftover in Path(cfg.storage_dir).glob(".*.safetensors.tmp"):  # a capture killed mid-write
            leftover.unlink(missing_ok=True)  # (other ranks write only after the barrier below)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    own_dir = world > 1 and run_dir is None
    if own_dir:  # ranks exchange layers through files: agree on a folder
        if rank == 0:  # (what ranks killed earlier left: their folders are named after their process)
            remove_dead_temps(tempfile.gettempdir(), "adaptwin-run")
        box = [tempfile.mkdtemp(prefix=temp_prefix("adaptwin-run")) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    if run_dir is not None and not own_dir:  # rank 0 looks before any rank writes there; every rank learns
        problem: list[str | None] = [None]
        if rank == 0:
            try:
                check_run_dir(run_dir)
            except ValueError as e:
                problem[0] = str(e)
        if world > 1:
            dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise ValueError(problem[0])
    if run_dir is not None:
        (run_dir / "layers").mkdir(parents=True, exist_ok=True)
        fingerprint = {"architecture": record.architecture, "compression": record.config,
                       "finetune": cfg.fingerprint(), "layers": layers, "calibration": data_digest(batches),
                       "weights": weights_digest(original)}
        if joint:
            fingerprint["groups"] = joint
        run_file = run_dir / "run.json"
        if rank == 0:
            remove_stale(run_dir)  # before any rank writes (the barrier below)
            if not run_file.exists():
                write_atomic(run_file, None, fingerprint)
        if world > 1:
            dist.barrier()
        check_run(run_file, fingerprint)

    def checkpoint(path: str) -> Path | None:
        return None if run_dir is None else run_dir / "layers" / f"{safe_name(path)}.safetensors"

    def unit(name: str) -> tuple[nn.Module, dict[str, torch.Tensor | None]]:
        """The module a unit trains (one layer, or a `_Group`) and its trainable masks."""
        paths = units[name]
        if len(paths) == 1:
            return compressed.get_submodule(paths[0]), _layer_masks(compressed, paths[0], cfg.mode)
        group = _Group([compressed.get_submodule(p) for p in paths])
        return group, _group_masks(group, [_layer_masks(compressed, p, cfg.mode) for p in paths])

    def load_checkpoint(path: str) -> LayerResult | None:
        ck = checkpoint(path)
        if ck is None or not ck.exists():
            return None
        module, trainable = unit(path)
        expected = {n: p for n, p in module.named_parameters() if n in trainable}
        try:
            with safe_open(str(ck), framework="pt") as f:
                meta = json.loads(f.metadata()["result"])
                stored = {name: f.get_tensor(name) for name in f.keys()}
            result = LayerResult(**meta)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for corrupt files
            raise ValueError(f"checkpoint {ck} is unreadable ({type(e).__name__}: {e}); it was not written "
                             "by this run's atomic writer - delete it to train the layer again") from None
        bad = sorted(set(stored) ^ set(expected)) + sorted(
            n for n in set(stored) & set(expected) if stored[n].shape != expected[n].shape
            or stored[n].dtype != expected[n].dtype)
        if bad:
            raise ValueError(f"checkpoint {ck} does not match layer {path} (parameters {bad[:3]} differ); "
                             "delete it to train the layer again")
        with torch.no_grad():
            for name, value in stored.items():
                expected[name].copy_(value)
        return result

    report = FinetuneReport()
    store = ActivationStore(cfg.storage, cfg.storage_dtype, cfg.storage_dir,
                            compute_dtype=next(compressed.parameters()).dtype)
    mine = [p for i, p in enumerate(units) if i % world == rank]
    results: dict[str, LayerResult] = {}
    for path in mine:
        done = load_checkpoint(path)
        if done is not None:
            results[path] = done
            report.resumed.append(path)
    todo = [p for p in mine if p not in results]
    if todo:  # inputs and targets from the original
        capture(original, [p for u in todo for p in units[u]], batches, store, run=run)
    bar = _progress_bar(cfg, progress, len(todo), rank)
    for path in todo:
        if cfg.sequential and path != layers[0]:
            inputs = ActivationStore(compute_dtype=store.compute_dtype)
            capture(compressed, [path], batches, inputs, record_outputs=False, run=run)
            for b in range(len(batches)):
                args, kwargs, _ = inputs.get(path, b)
                store.add(path, b, args, kwargs, store.get(path, b)[2])
            del inputs
        layer, masks = unit(path)
        members = units[path]
        source, marks = store, token_masks(batches, components[members[0]], original)
        if len(members) > 1:  # each member on its own call; the padding masks repeat along the stacked batch
            source = _GroupStore(store, members)
            marks = [[torch.cat([m] * len(members), 0) for m in ms] for ms in marks]

        def on_epoch(epoch: int, loss: float, path: str = path) -> None:
            if progress is not None:
                progress(path, epoch, cfg.epochs, loss)
            if bar is not None:
                bar.set_postfix_str(f"{path} epoch {epoch}/{cfg.epochs} loss {loss:.3g}")

        result = train_layer(layer, path, source, train_ids, val_ids, masks, epochs=cfg.epochs, lr=cfg.lr,
                             patience=cfg.patience, seed=layer_seed(cfg.seed, path), on_epoch=on_epoch,
                             token_masks=marks)
        for member in members:
            store.drop(member)
        results[path] = result
        ck = checkpoint(path)
        if ck is not None:
            trained = dict(layer.named_parameters())
            write_atomic(ck, {n: trained[n] for n in masks}, result.to_dict())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    report.capture_bytes = store.peak_nbytes
    if world > 1:
        dist.barrier()
        for path in units:
            if path not in results:
                loaded = load_checkpoint(path)
                if loaded is None:
                    raise RuntimeError(f"rank {rank}: layer {path} was not written by its rank")
                results[path] = loaded
        if own_dir:
            dist.barrier()  # every rank has read every layer
            if rank == 0:
                shutil.rmtree(run_dir, ignore_errors=True)
    report.layers = [results[p] for p in units]
    # what save writes and select_layers reads: this run's settings and errors, and the original's checksums
    record.finetune = {"config": cfg.to_dict(), **report.to_dict(),
                       "original_layers": layer_checksums(original, adapter)}
    compressed.adaptwin_finetune = report
    return report


def _progress_bar(cfg: FinetuneConfig, progress: Any, layers: int, rank: int) -> Any:
    """A tqdm bar over this rank's layers when ``cfg.progress`` and no ``progress`` callback is given."""
    if not cfg.progress or progress is not None or not layers:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=layers, desc=f"fine-tuning{f' (rank {rank})' if rank else ''}", unit="layer")
