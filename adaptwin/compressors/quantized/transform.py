"""Turn the factors that `product_twin` and `svd` built into quantised ones, and rebuild them for loading.

This composes with those compressors rather than repeating them: they factor (and the fine-tuner
trains) as usual; `quantize_modules` then swaps each factor `nn.Linear` / `LowRankLinear` for its
quantised counterpart in the *master* state, sharing the very Parameters (no copy), so layer-wise
fine-tuning trains them with fake quantisation (Eq. 10). `pack_modules` finally packs them. The record
then names the ``"quantized"`` compressor, whose spec wraps the base compressor's spec::

    {"base": "svd", "base_spec": {...}, "format": {"kind": "nf4", "blocksize": 64, "double_quant": false},
     "quantize_lora": false, "params": 123456}   # params: logical parameter count (for `adaptwin inspect`)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from adaptwin.compressors.base import Compressor
from adaptwin.compressors.quantized.layer import QuantLinear, QuantLowRankLinear, _QuantModule
from adaptwin.quant import QuantFormat
from adaptwin.registry import get_compressor


def _take(new: nn.Module, old: nn.Module, names: tuple[str, ...]) -> None:
    """Share ``old``'s Parameters with ``new`` (master state: one copy in memory, same tensors trained)."""
    for name in names:
        value = getattr(old, name)
        if value is not None:
            setattr(new, name, value)


def _svd(module: nn.Module, spec: dict[str, Any], fmt: QuantFormat, quantize_lora: bool, packed: bool) -> nn.Module:
    if getattr(module, "activation", None) is not None:
        raise ValueError(f"cannot quantise a LowRankLinear that runs its model's {module.activation} activation "
                         "(adaptwin.fuse_activations); call adaptwin.unfuse_activations(model) first")
    with torch.device("meta"):
        new = QuantLowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec["lora_rank"],
                                 spec["bias"], fmt=fmt, quantize_lora=quantize_lora, packed=packed)
    if not packed:
        _take(new, module, ("in_factor", "out_factor", "bias"))
    return new


def _linear(lin: nn.Linear, role: str, blocks: int, width: int, rank: int, fmt: QuantFormat, quantize_lora: bool,
            packed: bool) -> QuantLinear:
    with torch.device("meta"):
        new = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, role=role, blocks=blocks,
                          width=width, rank=rank, fmt=fmt, quantize_lora=quantize_lora, packed=packed)
    if not packed:
        _take(new, lin, ("weight", "bias"))
    return new


def _twin(module: nn.Module, spec: dict[str, Any], fmt: QuantFormat, quantize_lora: bool,
          packed: bool) -> nn.Module:
    if spec.get("module") == "output":  # BERT's output factor: columns are the heads' value directions
        if spec["vo_rank"] is None:
            return module
        width = spec["v_width"]
        return _linear(module, "out", spec["in_features"] // width, width, spec["vo_rank"], fmt, quantize_lora,
                       packed)
    h, hkv = spec["num_heads"], spec["num_kv_heads"]
    plan = []
    if spec["qk_rank"] is not None:
        plan += [("q_proj", "in", h, spec["qk_width"], spec["qk_rank"]),
                 ("k_proj", "in", hkv, spec["qk_width"], spec["qk_rank"])]
    if spec["vo_rank"] is not None:
        plan.append(("v_proj", "in", hkv, spec["v_width"], spec["vo_rank"]))
        if module.o_proj is not None:
            plan.append(("o_proj", "out", h, spec["v_width"], spec["vo_rank"]))
    for name, role, blocks, width, rank in plan:
        setattr(module, name, _linear(getattr(module, name), role, blocks, width, rank, fmt, quantize_lora, packed))
    return module


# Base compressor name -> how its module is quantised (module, base spec, format, quantize_lora, packed).
QUANTIZERS: dict[str, Callable[..., nn.Module]] = {"svd": _svd, "product_twin": _twin}


def _quantize(module: nn.Module, base: str, base_spec: dict[str, Any], fmt: QuantFormat, quantize_lora: bool,
              packed: bool) -> nn.Module:
    try:
        quantizer = QUANTIZERS[base]
    except KeyError:
        raise ValueError(f"quantization supports the factors of compressors {sorted(QUANTIZERS)}, "
                         f"not {base!r}") from None
    return quantizer(module, base_spec, fmt, quantize_lora, packed)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def quantize_modules(model: nn.Module, modules: dict[str, dict[str, Any]], fmt: QuantFormat,
                     quantize_lora: bool) -> None:
    """Swap the compressed modules ``{path: {"compressor", "spec"}}`` of ``model`` for quantised ones in the
    master (fake-quantised, trainable) state, and rewrite the entries to the ``"quantized"`` compressor."""
    for path, entry in list(modules.items()):
        if entry["compressor"] == QuantizedCompressor.name:
            raise ValueError(f"{path} is already quantised")
        module = model.get_submodule(path)
        new = _quantize(module, entry["compressor"], entry["spec"], fmt, quantize_lora, packed=False)
        if not any(isinstance(m, _QuantModule) for m in new.modules()):
            continue  # nothing factored here (e.g. an output projection left dense)
        _set(model, path, new)
        modules[path] = {"compressor": QuantizedCompressor.name,
                         "spec": {"base": entry["compressor"], "base_spec": entry["spec"], "format": fmt.to_dict(),
                                  "quantize_lora": quantize_lora}}


def pack_modules(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Pack every quantised module of ``model`` (the fp master factors are freed) and record their sizes."""
    for path, entry in modules.items():
        if entry["compressor"] != QuantizedCompressor.name:
            continue
        root = model.get_submodule(path)
        for m in root.modules():
            if isinstance(m, _QuantModule):
                m.pack()
        entry["spec"]["params"] = logical_params(root)


def logical_params(root: nn.Module) -> int:
    """Parameters ``root`` represents: quantised factors at their full (k, n) size, everything else as stored."""
    quant = {n for n, m in root.named_modules() if isinstance(m, _QuantModule)}
    total = sum(m.storage()[0] for m in root.modules() if isinstance(m, _QuantModule))
    return total + sum(t.numel() for name, t in root.state_dict().items() if name.rpartition(".")[0] not in quant)


class QuantizedCompressor(Compressor):
    """Rebuilds (and describes) quantised modules; it wraps another compressor and is never planned itself.

    Quantise with ``CompressionConfig(quantization="nf4" | "int8", ...)``.
    """

    name = "quantized"
    site_kind = "wrapper"

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("the 'quantized' compressor wraps another compressor's factors; choose it with "
                         "CompressionConfig(quantization='nf4' or 'int8'), not as attention_method/ffn_method")

    full_rank = param_count = compress = _refuse

    def build(self, spec: dict[str, Any]) -> nn.Module:
        fmt = _format(spec)
        base = get_compressor(spec["base"]).build(spec["base_spec"])
        return _quantize(base, spec["base"], spec["base_spec"], fmt, bool(spec.get("quantize_lora")), packed=True)

    def lora_mask(self, module: nn.Module, spec: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        if any(isinstance(m, _QuantModule) and m.packed for m in module.modules()):
            raise ValueError("packed quantised modules cannot be fine-tuned layer-wise; fine-tune while "
                             "compressing (adaptwin.compress(..., calibration=...)), which trains them with fake "
                             "quantisation before packing")
        return get_compressor(spec["base"]).lora_mask(module, spec["base_spec"])

    def describe(self, spec: dict[str, Any]) -> str:
        fmt = _format(spec)
        return (f"{get_compressor(spec['base']).describe(spec['base_spec'])}, {fmt.kind} block {fmt.blocksize}"
                f"{' dq' if fmt.double_quant else ''}, LoRA {'quantised' if spec.get('quantize_lora') else 'fp'}")


def _format(spec: dict[str, Any]) -> QuantFormat:
    try:
        return QuantFormat(**spec["format"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"quantized spec has a bad 'format' entry ({e}); expected kind, blocksize, "
                         "double_quant") from None
