"""The two open registries: compressors (what to do) and architecture adapters (where things are).

Outside code extends either with one call and no edit to this package; a name is registered once,
and re-registering needs ``overwrite=True`` so a typo cannot silently shadow a built-in.
"""

from __future__ import annotations

from typing import Any

_COMPRESSORS: dict[str, Any] = {}
_SITE_KINDS = ("attention", "ffn", "wrapper")  # wrapper: wraps another compressor's modules (quantized)
_ARCHITECTURES: dict[str, Any] = {}


def _register(table: dict[str, Any], kind: str, name: str, obj: Any, overwrite: bool) -> Any:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} needs a non-empty string name, got {name!r}")
    same = name in table and (table[name] is obj or type(table[name]) is type(obj))
    if name in table and not overwrite and not same:  # (the same class again, as a re-run cell does: fine)
        raise ValueError(f"{kind} {name!r} is already registered; pass overwrite=True to replace it")
    table[name] = obj
    return obj


def register_compressor(compressor: Any, *, overwrite: bool = False) -> Any:
    """Register a compressor instance (or class, instantiated with no arguments) under ``compressor.name``.

    A compressor turns one site found by an architecture adapter into replacement modules; see
    `adaptwin.compressors.Compressor` for the interface. Usable as a class decorator.
    """
    instance = compressor() if isinstance(compressor, type) else compressor
    for attr in ("name", "site_kind", "param_count", "compress", "build"):
        if not hasattr(instance, attr):
            raise ValueError(f"compressor {instance!r} lacks {attr!r}; see adaptwin.compressors.Compressor")
    kinds = instance.site_kind if isinstance(instance.site_kind, tuple) else (instance.site_kind,)
    if not kinds or any(k not in _SITE_KINDS for k in kinds):
        raise ValueError(f"compressor {instance.name!r} has site_kind {instance.site_kind!r}; allowed: "
                         f"{list(_SITE_KINDS)}, or a tuple of 'attention' and 'ffn'")
    _register(_COMPRESSORS, "compressor", instance.name, instance, overwrite)
    return compressor


def register_architecture(adapter: Any, *, overwrite: bool = False) -> Any:
    """Register an architecture adapter (instance or class) under every name in ``adapter.model_types``.

    Model types are Hugging Face ``config.model_type`` strings (PEFT keys its target-module table the
    same way). Usable as a class decorator.
    """
    instance = adapter() if isinstance(adapter, type) else adapter
    types = getattr(instance, "model_types", None)
    if not types or isinstance(types, str):
        raise ValueError(f"adapter {instance!r} must list its HF model types in .model_types (a tuple of str)")
    for attr in ("attention_sites", "ffn_sites", "components"):
        if not hasattr(instance, attr):
            raise ValueError(f"adapter {instance!r} lacks {attr!r}; see adaptwin.architectures.ArchitectureAdapter")
    for t in types:
        _register(_ARCHITECTURES, "architecture", t, instance, overwrite)
    return adapter


def get_compressor(name: str) -> Any:
    try:
        return _COMPRESSORS[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; registered: {list_compressors()}") from None


def get_architecture(model_type: str) -> Any:
    try:
        return _ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model type {model_type!r}; registered architectures: {list_architectures()} "
            "(add one with adaptwin.register_architecture)"
        ) from None


def list_compressors() -> list[str]:
    return sorted(_COMPRESSORS)


def list_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)
