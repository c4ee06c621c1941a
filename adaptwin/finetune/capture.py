"""Capture what each layer receives and returns, so a layer can be run and trained alone.

A forward hook on every layer records the full call — positional and keyword arguments (attention
masks, rotary position embeddings, encoder states for cross-attention) — and the layer's output, per
calibration batch. Stored in memory or streamed to disk as one safetensors file per layer and batch
(read back memory-mapped), optionally in float16/bfloat16; `ActivationStore.nbytes` reports what is held.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _flatten(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """JSON structure of ``obj`` with tensors replaced by ``{"__t": index}`` into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"__t": len(tensors) - 1}
    if isinstance(obj, (tuple, list)):
        return {"__seq": [_flatten(x, tensors) for x in obj], "tuple": isinstance(obj, tuple)}
    if isinstance(obj, dict):
        return {"__map": {str(k): _flatten(v, tensors) for k, v in obj.items()}}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(
        f"cannot capture a layer argument of type {type(obj).__name__}; run the calibration pass with "
        "use_cache=False (caches are not layer inputs to reproduce)"
    )


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "__t" in node:
            return tensors[f"t{node['__t']}"]
        if "__seq" in node:
            seq = [_unflatten(x, tensors) for x in node["__seq"]]
            return tuple(seq) if node["tuple"] else seq
        if "__map" in node:
            return {k: _unflatten(v, tensors) for k, v in node["__map"].items()}
    return node


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class ActivationStore:
    """Per layer and batch: ``(args, kwargs, output)`` of one recorded call.

    Args:
        storage: ``"memory"`` or ``"disk"``.
        dtype: storage dtype name for floating tensors (``"float32"``, ``"float16"``, ``"bfloat16"``);
            they are returned in ``compute_dtype``.
        directory: where ``"disk"`` storage writes (one ``.safetensors`` per layer and batch).
    """

    def __init__(self, storage: str = "memory", dtype: str = "float32", directory: str | os.PathLike | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        if storage not in ("memory", "disk"):
            raise ValueError(f"storage must be 'memory' or 'disk', got {storage!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"storage dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        if storage == "disk" and directory is None:
            raise ValueError("disk storage needs a directory")
        self.storage, self.dtype, self.compute_dtype = storage, _DTYPES[dtype], compute_dtype
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: dict[tuple[str, int], tuple[Any, Any, torch.Tensor]] = {}
        self._files: dict[tuple[str, int], Path] = {}
        self.nbytes = 0

    def _store_cast(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(self.dtype) if t.is_floating_point() else t

    def add(self, layer: str, batch: int, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        """Record (or replace) one call."""
        self._forget((layer, batch))
        record = _map_tensors((tuple(args), dict(kwargs), output), self._store_cast)
        if self.storage == "memory":
            self.nbytes += _nbytes(record)
            self._memory[(layer, batch)] = record
            return
        tensors: list[torch.Tensor] = []
        structure = _flatten(record, tensors)
        path = self.directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', layer)}.{batch}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({f"t{i}": t.contiguous() for i, t in enumerate(tensors)}, str(tmp),
                  metadata={"structure": json.dumps(structure)})
        os.replace(tmp, path)
        self.nbytes += path.stat().st_size
        self._files[(layer, batch)] = path

    def get(self, layer: str, batch: int) -> tuple[tuple, dict, torch.Tensor]:
        """The recorded call, floating tensors in ``compute_dtype``."""
        if self.storage == "memory":
            record = self._memory[(layer, batch)]
        else:
            with safe_open(str(self._files[(layer, batch)]), framework="pt") as f:
                structure = json.loads(f.metadata()["structure"])
                record = _unflatten(structure, {k: f.get_tensor(k) for k in f.keys()})
        args, kwargs, output = _map_tensors(
            record, lambda t: t.to(self.compute_dtype) if t.is_floating_point() else t)
        return tuple(args), dict(kwargs), output

    def batches(self, layer: str) -> list[int]:
        keys = self._memory if self.storage == "memory" else self._files
        return sorted(b for (name, b) in keys if name == layer)

    def drop(self, layer: str) -> None:
        """Forget a layer's records once it is trained (frees memory or disk)."""
        for key in [k for k in (self._memory if self.storage == "memory" else self._files) if k[0] == layer]:
            self._forget(key)

    def _forget(self, key: tuple[str, int]) -> None:
        if key in self._memory:
            self.nbytes -= _nbytes(self._memory.pop(key))
        elif key in self._files:
            path = self._files.pop(key)
            self.nbytes -= path.stat().st_size
            path.unlink(missing_ok=True)


def _nbytes(record: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in _leaves(record):
        if t.untyped_storage().data_ptr() not in seen:  # shared tensors (one mask for all layers) once
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


def _leaves(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _leaves(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _leaves(x)


def first_output(output: Any) -> torch.Tensor:
    """A layer's hidden-state output: the tensor itself or the first element of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def run_model(model: nn.Module, batch: Any) -> Any:
    """One calibration forward: ``model(**batch)`` for a dict, ``model(batch)`` otherwise, caches off."""
    if isinstance(batch, dict):
        kwargs = dict(batch)
        params = inspect.signature(model.forward).parameters
        if "use_cache" in params and "use_cache" not in kwargs:
            kwargs["use_cache"] = False
        return model(**kwargs)
    return model(batch)


def capture(model: nn.Module, layers: Iterable[str], batches: Iterable[Any], store: ActivationStore,
            *, record_outputs: bool = True, run: Callable[[nn.Module, Any], Any] = run_model) -> int:
    """Run ``model`` over ``batches`` and record every listed layer's calls into ``store``.

    Returns the number of batches. Each layer must be called once per forward (a layer called twice,
    e.g. shared weights, is refused: its inputs would be ambiguous).
    """
    state = {"batch": -1}
    seen: set[str] = set()
    handles = []

    def hook_for(path: str):
        def hook(module, args, kwargs, output):
            if path in seen:
                raise ValueError(f"layer {path} ran twice in one forward; layer-wise capture needs one call")
            seen.add(path)
            store.add(path, state["batch"], args, kwargs, first_output(output) if record_outputs else
                      torch.empty(0))
        return hook

    for path in layers:
        handles.append(model.get_submodule(path).register_forward_hook(hook_for(path), with_kwargs=True))
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                state["batch"] = i
                seen.clear()
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return state["batch"] + 1
