"""Save and load compressed models: one safetensors file plus ``adaptwin.json``, written atomically.

Layout of a save directory::

    adaptwin.json        format version, model class + HF config, CompressionConfig, the replaced
                         modules with the spec each compressor needs to rebuild them, the per-site
                         accounting, and the weights file's size and SHA-256
    model.safetensors    every parameter and persistent buffer; tied tensors stored once
    (other files)        tokenizer / feature-extractor files passed through ``extra_files``

Loading rebuilds the skeleton from the config with parameters on the meta device, swaps in empty
compressed modules, and assigns the tensors (one copy in memory). Anything truncated, tampered with,
or mismatched is refused with an error that names the problem; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from adaptwin._files import check_writable, give_default_mode, remove_dead_temps, replace_dir, temp_prefix
from adaptwin.compress import RECORD_ATTR, CompressionRecord, _submodule_setter, compression_record
from adaptwin.config import CompressionConfig
from adaptwin.registry import get_architecture, get_compressor

FORMAT = "adaptwin"
FORMAT_VERSION = 1
CONFIG_NAME = "adaptwin.json"
WEIGHTS_NAME = "model.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _dedup_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory (tied embeddings) once; return ``{alias: stored name}``."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().contiguous()
    return unique, aliases


def check_replaceable(target: Path) -> None:
    """Refuse a target `save` must not replace: a file, a non-empty folder that is no adaptwin save, or a save
    holding files that no save wrote (a replacement swaps the whole folder: they would be lost). Saves written
    before 2026-11-26 do not list their files, so only their weights and config are known. The folder it would be
    created in must be one this process can write (`check_writable`)."""
    check_writable(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    names = sorted(p.name for p in target.iterdir())
    if not names:
        return
    if CONFIG_NAME not in names:
        raise ValueError(f"{target} is a non-empty directory that is not an adaptwin save; choose another path")
    try:
        listed = json.loads((target / CONFIG_NAME).read_text(encoding="utf-8")).get("files")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        listed = None
    if isinstance(listed, list):
        foreign = [n for n in names if n not in listed]
        if foreign:
            raise ValueError(f"{target} holds files its adaptwin save did not write ({', '.join(foreign[:5])}"
                             f"{', ...' if len(foreign) > 5 else ''}); replacing the save would delete them: move "
                             "them, or choose another path")


def _canonical_header(f) -> None:
    """Rewrite a safetensors header, in place and at its length, with its ``__metadata__`` keys sorted.

    safetensors writes the metadata from a hash map, in an order that changes from process to process, so
    the same model saved twice gave files, and SHA-256s in adaptwin.json, that differed in those bytes alone.
    """
    f.seek(0)
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) <= size:  # (the same entries in another order: the same length; safetensors pads with spaces)
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def save(model: nn.Module, path: str | os.PathLike, *, extra_files: Iterable[str | os.PathLike] = (),
         overwrite: bool = True) -> Path:
    """Write a compressed model to directory ``path`` atomically (a temporary folder, then a rename).

    Args:
        model: a model returned by `adaptwin.compress`.
        path: target directory; an existing adaptwin save there is replaced (the whole folder), any other
            non-empty directory is refused, and so is a save holding files it did not write.
        extra_files: files copied beside the weights (tokenizer, preprocessor config, ...).
        overwrite: allow replacing an existing adaptwin save directory.
    """
    record = compression_record(model)
    adapter = get_architecture(record.architecture)
    target = Path(path)
    remove_dead_temps(target.parent, target.name)  # what a save killed mid-write (kill -9) left beside it
    check_replaceable(target)
    if target.exists() and (target / CONFIG_NAME).exists() and not overwrite:
        raise ValueError(f"{target} already holds an adaptwin save; pass overwrite=True to replace it")
    extras = [Path(p) for p in extra_files]
    for p in extras:
        if not p.is_file():
            raise ValueError(f"extra file {p} does not exist")
        if p.name in (CONFIG_NAME, WEIGHTS_NAME):
            raise ValueError(f"extra file {p} would overwrite {p.name}")

    tensors, aliases = _dedup_tied(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": FORMAT})
        with open(tmp / WEIGHTS_NAME, "rb+") as f:
            _canonical_header(f)
            os.fsync(f.fileno())
        for p in extras:
            shutil.copyfile(p, tmp / p.name)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": adapter.model_record(model),
            "compression": record.to_dict(),
            "aliases": aliases,
            "weights": {"file": WEIGHTS_NAME, "bytes": (tmp / WEIGHTS_NAME).stat().st_size,
                        "sha256": _sha256(tmp / WEIGHTS_NAME), "tensors": len(tensors)},
            "summary": record.summary(),
            "files": sorted([CONFIG_NAME, WEIGHTS_NAME, *(p.name for p in extras)]),
        }
        _fsync_write(tmp / CONFIG_NAME, json.dumps(meta, indent=1, sort_keys=True, default=_json_default))
        give_default_mode(tmp / WEIGHTS_NAME)  # safetensors writes it 0600
        give_default_mode(tmp, directory=True)  # mkdtemp makes it 0700
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_model_size(root: Path, probe: nn.Module, record: CompressionRecord) -> None:
    """Refuse a model config that describes a far larger model than the save holds (an edited ``vocab_size``
    of 10^12), before building it: that build allocates the original parameters before they become meta.

    The bound: what the weights file stores plus the original size of every compressed site, twice over.
    """
    stored = sum(math.prod(shape) for _, shape, _ in read_tensor_layout(root).values())
    original = sum(int(row.get("params_before", 0)) for row in record.sites)
    described = {id(p): p for p in probe.parameters()}
    total = sum(p.numel() for p in described.values())
    if total > 2 * (stored + original) + (1 << 20):
        names = {id(p): n for n, p in probe.named_parameters()}
        big = sorted(described.values(), key=lambda p: -p.numel())[:3]
        raise ValueError(f"its config describes a model of {total:,} parameters, but the save holds {stored:,} "
                         f"values for a model of about {stored + original:,} (largest: "
                         + ", ".join(f"{names[id(p)]} {tuple(p.shape)}" for p in big) + ")")


@contextlib.contextmanager
def _rebuilding(root: Path, what: str):
    """Turn the errors an edited or foreign adaptwin.json raises while a part is rebuilt into one ValueError."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, ArithmeticError, IndexError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{root / CONFIG_NAME}: {what} cannot be rebuilt ({detail}); edited, or written by another "
                         f"adaptwin version?") from e


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``adaptwin.json`` of a save directory (no weights are read)."""
    root = Path(path)
    cfg = root / CONFIG_NAME
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    if not cfg.is_file():
        raise ValueError(f"{root} is not an adaptwin save: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg} is not valid JSON (truncated or edited?): {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg} is not an adaptwin config (a JSON object is expected, got {type(meta).__name__})")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg} is not an adaptwin config (format field {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg} has format_version {meta.get('format_version')!r}; this adaptwin reads "
                         f"{FORMAT_VERSION}")
    for key in ("model", "compression", "weights", "aliases"):
        if key not in meta:
            raise ValueError(f"{cfg} lacks the {key!r} section")
        if not isinstance(meta[key], dict):
            raise ValueError(f"{cfg}: the {key!r} section must be a JSON object, got {type(meta[key]).__name__}")
    weights = meta["weights"]
    file = weights.get("file", WEIGHTS_NAME)
    if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
        raise ValueError(f"{cfg}: weights.file must be a file name inside the save directory, got {file!r}")
    for key, kind in (("bytes", int), ("sha256", str)):
        if key in weights and (not isinstance(weights[key], kind) or isinstance(weights[key], bool)):
            raise ValueError(f"{cfg}: weights.{key} must be a JSON {'integer' if kind is int else 'string'}, got "
                             f"{weights[key]!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta["aliases"].items()):
        raise ValueError(f"{cfg}: aliases must map tensor names to tensor names (strings)")
    return meta


def read_tensor_layout(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """``{tensor name: (safetensors dtype, shape, bytes)}`` of a save's weights, from the file header only."""
    meta = read_meta(path)
    weights = Path(path) / meta["weights"].get("file", WEIGHTS_NAME)
    try:
        with open(weights, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= min(100 << 20, weights.stat().st_size - 8):
                raise ValueError(f"header length {size}")
            header = json.loads(f.read(size))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            out[name] = (info["dtype"], tuple(info["shape"]), int(end) - int(start))
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{weights} has no readable safetensors header ({e})") from None


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild a model saved by `save`, without the original weights.

    Args:
        path: the save directory.
        device: where to put the tensors.
        verify: check the weights file's SHA-256 against ``adaptwin.json`` (catches truncation and edits).
    """
    root = Path(path)
    meta = read_meta(root)
    with _rebuilding(root, "the 'compression' section"):
        record = CompressionRecord.from_dict(meta["compression"])
        CompressionConfig.from_dict(record.config)  # validates the stored settings
    try:
        adapter = get_architecture(record.architecture)
    except ValueError as e:
        raise ValueError(f"{e}; a save made with an architecture adapter registered by your own code loads once "
                         "that adapter is registered in this process too") from None
    weights = root / meta["weights"].get("file", WEIGHTS_NAME)
    if not weights.is_file():
        raise ValueError(f"{root}: weights file {weights.name} is missing")
    size = weights.stat().st_size
    if size != meta["weights"].get("bytes"):
        raise ValueError(f"{weights} has {size} bytes, adaptwin.json records {meta['weights'].get('bytes')} "
                         "(truncated or replaced)")
    if verify and _sha256(weights) != meta["weights"].get("sha256"):
        raise ValueError(f"{weights} does not match the SHA-256 recorded in adaptwin.json (modified or corrupt)")

    with _rebuilding(root, "the 'model' section"):
        with torch.device("meta"):  # no memory at all: sizes are checked before anything is allocated
            _check_model_size(root, adapter.build_empty(meta["model"]), record)
        model = adapter.build_empty(meta["model"])
    for mpath, entry in record.modules.items():
        try:
            model.get_submodule(mpath)
        except AttributeError:
            raise ValueError(f"saved module path {mpath!r} does not exist in the rebuilt model") from None
        with _rebuilding(root, f"module {mpath!r}"):
            module = get_compressor(entry["compressor"]).build(entry["spec"])
        _submodule_setter(model, mpath, module)

    expected = model.state_dict(keep_vars=True)
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt", device=str(device)) as f:
            for name in f.keys():
                state[name] = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{weights} is not a readable safetensors file: {e}") from None
    for alias, name in meta["aliases"].items():
        if name not in state:
            raise ValueError(f"tied tensor {alias!r} points at {name!r}, which is not in {weights.name}")
        state[alias] = state[name]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{root} does not match its model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                         f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{root}: tensor shapes do not match the model (name, stored, expected): {bad[:5]}")
    # packed codes keep their integer dtype and every other tensor is floating (its precision is the saved model's)
    bad = [(k, str(state[k].dtype), str(v.dtype)) for k, v in expected.items()
           if state[k].dtype != v.dtype and not (v.is_floating_point() and state[k].is_floating_point())]
    if bad:
        raise ValueError(f"{root}: tensor dtypes do not match the model (name, stored, expected): {bad[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    for name, alias_of in meta["aliases"].items():  # re-tie shared tensors to one Parameter
        parent, _, leaf = name.rpartition(".")
        src_parent, _, src_leaf = alias_of.rpartition(".")
        src = getattr(model.get_submodule(src_parent), src_leaf)
        setattr(model.get_submodule(parent), leaf, src)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ValueError(f"{root}: no stored values for {still_meta[:5]}")
    model.to(device)
    setattr(model, RECORD_ATTR, record)
    return model.eval()
