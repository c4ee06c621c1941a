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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _flatten(obj: Any, tensors: list[torch.Tensor], index: dict[int, int] | None = None) -> Any:
    """JSON structure of ``obj`` with tensors replaced by ``{"__t": index}`` into ``tensors``.

    A tensor that appears twice is stored once (safetensors refuses tensors that share memory). A dense
    tensor whose strides are a permutation of contiguous ones (Whisper's encoder states are (B, T, d)
    with T innermost) is stored contiguous in that order with ``"perm"``, so it reads back with its
    original strides: kernels see the same layout as in the captured forward, and disk storage trains
    bit-identically to memory storage.
    """
    index = {} if index is None else index
    if isinstance(obj, torch.Tensor):
        if id(obj) not in index:
            index[id(obj)] = len(tensors)
            tensors.append(obj)
        node: dict[str, Any] = {"__t": index[id(obj)]}
        order = _stride_order(obj)
        if order is not None:
            node["perm"] = order
        return node
    if isinstance(obj, (tuple, list)):
        return {"__seq": [_flatten(x, tensors, index) for x in obj], "tuple": isinstance(obj, tuple)}
    if isinstance(obj, dict):
        return {"__map": {str(k): _flatten(v, tensors, index) for k, v in obj.items()}}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(
        f"cannot capture a layer argument of type {type(obj).__name__}; run the calibration pass with "
        "use_cache=False (caches are not layer inputs to reproduce)"
    )


def _stride_order(t: torch.Tensor) -> list[int] | None:
    """Dimension order (outermost first) that makes ``t`` contiguous, when it is a non-trivial permutation."""
    if t.ndim < 2 or t.is_contiguous():
        return None
    order = sorted(range(t.ndim), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else None


def _to_file(t: torch.Tensor) -> torch.Tensor:
    order = _stride_order(t)
    return (t.permute(order) if order is not None else t).contiguous()


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "__t" in node:
            t = tensors[f"t{node['__t']}"]
            if "perm" in node:  # stored as t.permute(perm): undo it (argsort of perm)
                t = t.permute(sorted(range(t.ndim), key=node["perm"].__getitem__))
            return t
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


def _tensor_key(t: torch.Tensor) -> tuple | None:
    """Identity of a tensor's current contents: where it lives, its layout, and its version counter (bumped
    by every in-place change, so a tensor the model rescales in place between two layers is stored anew).
    None for inference-mode tensors, which have no version counter: those are never shared."""
    try:
        version = t._version
    except RuntimeError:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device,
            version)


class ActivationStore:
    """Per layer and batch: ``(args, kwargs, output)`` of one recorded call.

    Every stored tensor is the store's own copy (never a view into the model's buffers). Within one
    calibration forward (`sharing`), a tensor that several layers receive - layer i's output is layer
    i+1's input, one mask or rotary table serves every layer, the encoder states every decoder layer -
    is copied once and shared, so memory holds ~(L+1) hidden states per batch, not 2L.

    Floating tensors wider than the storage dtype are stored in it, unless that would turn finite values
    into infinities: an additive mask at ``finfo(float32).min`` becomes -inf in float16 *and* bfloat16
    (both round -3.4e38 past their largest finite value), which turns a fully masked query row from a
    uniform softmax into NaN or zeros; such tensors (and activations beyond float16's 65504) stay exact.

    Args:
        storage: ``"memory"`` or ``"disk"``.
        dtype: storage dtype name for floating tensors (``"float32"``, ``"float16"``, ``"bfloat16"``);
            they are returned in ``compute_dtype``.
        directory: where ``"disk"`` storage writes (one ``.safetensors`` per layer and batch).
        compute_dtype: the dtype `get` returns floating tensors in (the model's).

    ``nbytes`` is what is held now: for memory, the bytes of the distinct tensor storages the store
    references; for disk, the size of its files. ``peak_nbytes`` is the most it ever held.
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
        self._files: dict[tuple[str, int], tuple[Path, int]] = {}
        self._versions: dict[tuple[str, int], list[int]] = {}  # of the stored tensors, to catch in-place changes
        self._held: dict[int, list[int]] = {}  # storage data_ptr -> [records referencing it, bytes]
        self._shared: dict[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.nbytes = 0
        self.peak_nbytes = 0

    @contextmanager
    def sharing(self) -> Iterator[None]:
        """Within this block (one forward), a tensor recorded again is stored once.

        The sources are kept alive until the block ends, so a freed tensor's address cannot be reused
        by a new one and be mistaken for it.
        """
        self._shared = {}
        try:
            yield
        finally:
            self._shared = None

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        key = _tensor_key(t) if self._shared is not None else None
        if key is not None and key in self._shared:
            return self._shared[key][1]
        out = None
        if t.is_floating_point() and t.element_size() > self.dtype.itemsize:
            low = t.to(self.dtype)
            if torch.equal(torch.isfinite(low), torch.isfinite(t)):  # see the class docstring
                out = low
        if out is None:
            out = t.clone()  # own copy; dense tensors keep their strides (preserve_format)
        if key is not None:
            self._shared[key] = (t, out)
        return out

    def add(self, layer: str, batch: int, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        """Record (or replace) one call."""
        self.put(layer, batch, self.keep((tuple(args), dict(kwargs))), self.keep(output))

    def keep(self, obj: Any) -> Any:
        """``obj`` with every tensor replaced by the store's copy of it (in the storage dtype)."""
        return _map_tensors(obj, self._cast)

    def put(self, layer: str, batch: int, call: tuple[tuple, dict], output: torch.Tensor) -> None:
        """Record one call whose tensors `keep` already copied: ``call = keep((args, kwargs))``."""
        self._forget((layer, batch))
        record = (*call, output)
        if self.storage == "memory":
            self._memory[(layer, batch)] = record
            self._versions[(layer, batch)] = [t._version for t in _leaves(record)]
            for ptr, size in _storages(record).items():
                held = self._held.setdefault(ptr, [0, size])
                held[0] += 1
                if held[0] == 1:
                    self.nbytes += size
        else:
            tensors: list[torch.Tensor] = []
            structure = _flatten(record, tensors)
            path = self.directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', layer)}.{batch}.safetensors"
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({f"t{i}": _to_file(t) for i, t in enumerate(tensors)}, str(tmp),
                      metadata={"structure": json.dumps(structure)})
            os.replace(tmp, path)
            size = path.stat().st_size
            self.nbytes += size
            self._files[(layer, batch)] = (path, size)
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)

    def get(self, layer: str, batch: int) -> tuple[tuple, dict, torch.Tensor]:
        """The recorded call, floating tensors in ``compute_dtype`` (not to be modified in place)."""
        if self.storage == "memory":
            record = self._memory[(layer, batch)]
            if [t._version for t in _leaves(record)] != self._versions[(layer, batch)]:
                raise RuntimeError(f"the stored call of {layer} (batch {batch}) was modified in place, by the "
                                   "layer itself or by its caller; a layer trained alone must not change its "
                                   "inputs in place")
        else:
            with safe_open(str(self._files[(layer, batch)][0]), framework="pt") as f:
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
            del self._versions[key]
            for ptr in _storages(self._memory.pop(key)):
                held = self._held[ptr]
                held[0] -= 1
                if held[0] == 0:
                    self.nbytes -= held[1]
                    del self._held[ptr]
        elif key in self._files:
            path, size = self._files.pop(key)
            self.nbytes -= size
            path.unlink(missing_ok=True)


def _storages(record: Any) -> dict[int, int]:
    """``{storage data_ptr: bytes}`` of the distinct storages ``record``'s tensors live in."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _leaves(record)}


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


def frame_mask(model: nn.Module, batch: Any) -> torch.Tensor | None:
    """(B, T) mask of an audio encoder's real frames, or None.

    A wav2vec2 / HuBERT batch's ``attention_mask`` marks samples (B, S), but its layers see frames, S / 320
    of them; the model maps sample lengths to frame lengths itself (``_get_feature_vector_attention_mask``,
    as its encoder does), so padded frames can be left out of the fine-tuning loss and the statistics.
    """
    if not isinstance(batch, dict):
        return None
    mask, values = batch.get("attention_mask"), batch.get("input_values")
    to_frames = getattr(model, "_get_feature_vector_attention_mask", None)
    lengths = getattr(model, "_get_feat_extract_output_lengths", None)
    if (to_frames is None or lengths is None or not isinstance(mask, torch.Tensor)
            or not isinstance(values, torch.Tensor) or mask.ndim != 2 or tuple(mask.shape) != tuple(values.shape[:2])):
        return None
    frames = int(lengths(torch.tensor(values.shape[1])))
    return to_frames(frames, mask).to(torch.long)


def capture(model: nn.Module, layers: Iterable[str], batches: Iterable[Any], store: ActivationStore,
            *, record_outputs: bool = True, run: Callable[[nn.Module, Any], Any] = run_model) -> int:
    """Run ``model`` over ``batches`` and record every listed layer's calls into ``store``.

    Returns the number of batches. Each layer must be called once per forward (a layer called twice,
    e.g. shared weights, is refused: its inputs would be ambiguous).
    """
    state = {"batch": -1}
    seen: set[str] = set()
    pending: dict[str, tuple[tuple, dict]] = {}
    handles = []

    def pre_hook_for(path: str):
        def pre_hook(module, args, kwargs):  # copy the inputs before the layer runs: it may change them in place
            if path in seen:
                raise ValueError(f"layer {path} ran twice in one forward; layer-wise capture needs one call")
            seen.add(path)
            pending[path] = store.keep((tuple(args), dict(kwargs)))
        return pre_hook

    def hook_for(path: str):
        def hook(module, args, kwargs, output):
            out = store.keep(first_output(output)) if record_outputs else torch.empty(0)
            store.put(path, state["batch"], pending.pop(path), out)
        return hook

    for path in layers:
        module = model.get_submodule(path)
        handles.append(module.register_forward_pre_hook(pre_hook_for(path), with_kwargs=True))
        handles.append(module.register_forward_hook(hook_for(path), with_kwargs=True))
    training = model.training
    model.eval()  # the targets are the model as it runs in use: no dropout (a model just trained is in train mode)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                state["batch"] = i
                seen.clear()
                with store.sharing():
                    run(model, batch)
                pending.clear()  # a layer whose forward raised leaves its inputs here
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return state["batch"] + 1
