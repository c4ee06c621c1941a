"""Layer-wise fine-tuning of a compressed model against its original: capture, train, checkpoint, resume.

Independent mode (the paper's) trains every layer on the original model's inputs, so layers are
independent and can be spread over torch.distributed ranks (``torchrun --nproc-per-node N``; gloo on
CPU, NCCL on GPUs): rank r trains layers r, r+N, ... and every rank assembles all of them from the
run directory. Sequential mode trains layer i on the outputs of the already trained layers before it.
Each finished layer is written atomically to ``run_dir``; a rerun of the same command skips it, and
because every layer has its own seed a killed-and-resumed run ends with the same weights (bit for bit
on CPU; tests/test_resume.py kills runs with SIGKILL to check). ``run_dir/run.json`` fingerprints what
the weights depend on - the original's weights, the calibration data, the compression and fine-tuning
settings - and a run directory of any other run is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adaptwin.compress import compression_record
from adaptwin.finetune.capture import ActivationStore, capture, run_model
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


def _safe(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", path)


def _data_digest(batches: list[Any]) -> str:
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for k in sorted(obj):
                h.update(str(k).encode())
                feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                feed(x)
        else:
            h.update(repr(obj).encode())

    feed(batches)
    return h.hexdigest()


def _weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes): the run's starting point."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_TMP = ".tmp-"  # prefix of files being written; never a checkpoint, removed when a run starts


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (the directory entry), where the platform allows opening a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor] | None, meta: dict[str, Any]) -> None:
    """Write ``path`` (safetensors with ``meta`` as JSON, or a JSON file when ``tensors`` is None) atomically.

    Written under a temporary name in the same folder, flushed to disk, then renamed: a reader (or a
    resumed run) sees the whole file or none. A process killed mid-write leaves only the temporary,
    which `_remove_stale` deletes and nothing ever loads.
    """
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP}{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        if tensors is None:
            Path(tmp).write_text(json.dumps(meta, indent=1))
        else:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp,
                      metadata={"result": json.dumps(meta)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it the mode open() would have
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _remove_stale(run_dir: Path) -> None:
    for folder in (run_dir, run_dir / "layers"):
        for leftover in folder.glob(f"{_TMP}*"):
            leftover.unlink(missing_ok=True)


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


def finetune(
    original: nn.Module,
    compressed: nn.Module,
    calibration: Iterable[Any],
    config: FinetuneConfig | None = None,
    *,
    run: Callable[[nn.Module, Any], Any] = run_model,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> FinetuneReport:
    """Train each compressed layer of ``compressed`` to reproduce ``original``'s layer (in place).

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
        box = [tempfile.mkdtemp(prefix="adaptwin-run-") if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    if run_dir is not None:
        (run_dir / "layers").mkdir(parents=True, exist_ok=True)
        fingerprint = {"architecture": record.architecture, "compression": record.config,
                       "finetune": cfg.fingerprint(), "layers": layers, "calibration": _data_digest(batches),
                       "weights": _weights_digest(original)}
        run_file = run_dir / "run.json"
        if rank == 0:
            _remove_stale(run_dir)  # before any rank writes (the barrier below)
            if not run_file.exists():
                _write_atomic(run_file, None, fingerprint)
        if world > 1:
            dist.barrier()
        _check_run(run_file, fingerprint)

    def checkpoint(path: str) -> Path | None:
        return None if run_dir is None else run_dir / "layers" / f"{_safe(path)}.safetensors"

    def load_checkpoint(path: str) -> LayerResult | None:
        ck = checkpoint(path)
        if ck is None or not ck.exists():
            return None
        expected = {n: p for n, p in compressed.get_submodule(path).named_parameters()
                    if n in _layer_masks(compressed, path, cfg.mode)}
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
    mine = [p for i, p in enumerate(layers) if i % world == rank]
    results: dict[str, LayerResult] = {}
    for path in mine:
        done = load_checkpoint(path)
        if done is not None:
            results[path] = done
            report.resumed.append(path)
    todo = [p for p in mine if p not in results]
    if todo:
        capture(original, todo, batches, store, run=run)  # inputs and targets from the original
    bar = _progress_bar(cfg, progress, len(todo), rank)
    for path in todo:
        if cfg.sequential and path != layers[0]:
            inputs = ActivationStore(compute_dtype=store.compute_dtype)
            capture(compressed, [path], batches, inputs, record_outputs=False, run=run)
            for b in range(len(batches)):
                args, kwargs, _ = inputs.get(path, b)
                store.add(path, b, args, kwargs, store.get(path, b)[2])
            del inputs
        layer = compressed.get_submodule(path)
        masks = _layer_masks(compressed, path, cfg.mode)

        def on_epoch(epoch: int, loss: float, path: str = path) -> None:
            if progress is not None:
                progress(path, epoch, cfg.epochs, loss)
            if bar is not None:
                bar.set_postfix_str(f"{path} epoch {epoch}/{cfg.epochs} loss {loss:.3g}")

        result = train_layer(layer, path, store, train_ids, val_ids, masks, epochs=cfg.epochs, lr=cfg.lr,
                             patience=cfg.patience, seed=layer_seed(cfg.seed, path), on_epoch=on_epoch,
                             token_masks=token_masks(batches, components[path]))
        store.drop(path)
        results[path] = result
        ck = checkpoint(path)
        if ck is not None:
            trained = dict(layer.named_parameters())
            _write_atomic(ck, {n: trained[n] for n in masks}, result.to_dict())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    report.capture_bytes = store.peak_nbytes
    if world > 1:
        dist.barrier()
        for path in layers:
            if path not in results:
                loaded = load_checkpoint(path)
                if loaded is None:
                    raise RuntimeError(f"rank {rank}: layer {path} was not written by its rank")
                results[path] = loaded
        if own_dir:
            dist.barrier()  # every rank has read every layer
            if rank == 0:
                shutil.rmtree(run_dir, ignore_errors=True)
    report.layers = [results[p] for p in layers]
    return report


def _check_run(run_file: Path, fingerprint: dict[str, Any]) -> None:
    try:
        previous = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{run_file} is unreadable ({e}); use a new run_dir") from None
    diff = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
    if diff:
        raise ValueError(f"run_dir {run_file.parent} holds a different run (differs in {diff}); "
                         "use a new run_dir, or the same model, data and settings to resume it")


def _progress_bar(cfg: FinetuneConfig, progress: Any, layers: int, rank: int) -> Any:
    """A tqdm bar over this rank's layers when ``cfg.progress`` and no ``progress`` callback is given."""
    if not cfg.progress or progress is not None or not layers:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=layers, desc=f"fine-tuning{f' (rank {rank})' if rank else ''}", unit="layer")
