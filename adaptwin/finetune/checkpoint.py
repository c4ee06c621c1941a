"""The run directory of layer-wise fine-tuning: its fingerprint, atomic checkpoint writes, and stale files.

``run.json`` records what the weights depend on (the original's weights, the calibration data, the
compression and fine-tuning settings) as digests; a run directory of any other run is refused. Every file
is written under a temporary name, flushed and renamed, so a reader sees a whole file or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adaptwin._files import fsync_dir, give_default_mode


def safe_name(path: str) -> str:
    """A layer path as a file name (characters outside [A-Za-z0-9_.-] become _)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", path)


def data_digest(batches: list[Any]) -> str:
    """SHA-256 of the calibration batches: tensors' dtypes, shapes and bytes, dict keys, other values' repr."""
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


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes): the run's starting point."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_TMP = ".tmp-"  # prefix of files being written; never a checkpoint, removed when a run starts


def write_atomic(path: Path, tensors: dict[str, torch.Tensor] | None, meta: dict[str, Any]) -> None:
    """Write ``path`` (safetensors with ``meta`` as JSON, or a JSON file when ``tensors`` is None) atomically.

    Written under a temporary name in the same folder, flushed to disk, then renamed: a reader (or a
    resumed run) sees the whole file or none. A process killed mid-write leaves only the temporary,
    which `remove_stale` deletes and nothing ever loads.
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
        give_default_mode(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale(run_dir: Path) -> None:
    for folder in (run_dir, run_dir / "layers"):
        for leftover in folder.glob(f"{_TMP}*"):
            leftover.unlink(missing_ok=True)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a ``run_dir`` that is neither new, empty, nor an earlier run's (it holds ``run.json``): a run
    writes ``run.json``, ``layers/`` and ``activations/`` there, beside whatever else the folder holds."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ValueError(f"run_dir {run_dir} exists and is not a directory")
    if any(run_dir.iterdir()) and not (run_dir / "run.json").is_file():
        raise ValueError(f"run_dir {run_dir} is a non-empty folder that holds no earlier run (no run.json); give a "
                         "new or empty folder, or the run_dir of the run to resume")


def check_run(run_file: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a run directory whose ``run.json`` differs from ``fingerprint`` (another model, data or settings)."""
    try:
        previous = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{run_file} is unreadable ({e}); use a new run_dir") from None
    diff = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
    if diff:
        raise ValueError(f"run_dir {run_file.parent} holds a different run (differs in {diff}); "
                         "use a new run_dir, or the same model, data and settings to resume it")
