"""Inference-time rewiring that changes no weights: FFN activations fused into the compressed linear before
them, layer stacks fed contiguous hidden states, and the output head's few-row calls run as a GEMV.

    fused = adaptwin.fuse_activations(model)   # paths of the linears that took their activation over
    adaptwin.unfuse_activations(model)         # back to the model's own activation modules
    adaptwin.contiguous_layer_inputs(model)    # first layer of each stack: its input made contiguous
    adaptwin.gemv_output_head(model)           # a float32 output head's decoding steps as a streaming GEMV
    adaptwin.prepare_inference(model)          # all three

The architecture adapter names the pairs (``activation_pairs``: Whisper's fc1 -> activation_fn, BERT's
intermediate.dense -> intermediate_act_fn, wav2vec2's intermediate_dense -> intermediate_act_fn). A pair
is fused when the linear is a compressed module that lists the activation in ``fusable_activations``
(`LowRankLinear` and the packed `QuantLowRankLinear`: exact GELU) and the activation module is that
function. The activation module is then
replaced by `FusedActivation` (an identity that keeps the original), so the model computes the same
function: the fused form only changes the rounding (see `adaptwin.ops.linear_act`).

Nothing of this is saved: the state dict is unchanged, `adaptwin.save` writes the usual checkpoint and
`adaptwin.load` returns the unfused model (fuse it again). Quantising a compressed model refuses fused
linears (unfuse first); `adaptwin.select_layers` unfuses before it puts original linears back and fuses
the layers left compressed again. Code that swaps a fused linear out by hand must unfuse first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptwin.architectures import model_type_of
from adaptwin.compress import _submodule_setter
from adaptwin.ops.rank_linear import ABSENT, gemv_rows, parameters_of, run_rank_linear, takes_gemv
from adaptwin.registry import get_architecture


class FusedActivation(nn.Identity):
    """Stands where the model's activation module was, while ``linear`` (at path ``into``) applies it."""

    def __init__(self, original: nn.Module, linear: nn.Module, into: str) -> None:
        super().__init__()
        self.original, self.into = original, into
        object.__setattr__(self, "linear", linear)  # a reference, not a submodule (its state lives at `into`)

    def extra_repr(self) -> str:
        return f"fused into {self.into}"


def activation_name(module: nn.Module) -> str | None:
    """The `adaptwin.ops.linear_act` name of an activation module, or None if it is not one of those."""
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return "gelu"
    if type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu:  # transformers'
        return "gelu"
    return None


def fuse_activations(model: nn.Module) -> list[str]:
    """Fuse every activation the model's adapter pairs with a compressed linear that can run it; returns the
    paths of the linears fused now (pairs fused before, or not fusable, are left as they are)."""
    adapter = get_architecture(model_type_of(model))
    fused = []
    for linear_path, act_path in adapter.activation_pairs(model):
        linear, act = model.get_submodule(linear_path), model.get_submodule(act_path)
        name = activation_name(act)
        if name is None or name not in getattr(linear, "fusable_activations", ()) or linear.activation is not None:
            continue
        linear.activation = name
        _submodule_setter(model, act_path, FusedActivation(act, linear, linear_path))
        fused.append(linear_path)
    return fused


def unfuse_activations(model: nn.Module) -> list[str]:
    """Undo `fuse_activations`: the original activation modules back in place; returns the linears' paths."""
    undone = []
    for path, module in list(model.named_modules()):
        if isinstance(module, FusedActivation):
            module.linear.activation = None
            _submodule_setter(model, path, module.original)
            undone.append(module.into)
    return undone


def _contiguous_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: the layer's hidden states (first positional argument, or ``hidden_states=``) made
    contiguous when they are not; nothing else touched."""
    if args and isinstance(args[0], torch.Tensor):
        return None if args[0].is_contiguous() else ((args[0].contiguous(), *args[1:]), kwargs)
    x = kwargs.get("hidden_states")
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return args, {**kwargs, "hidden_states": x.contiguous()}
    return None


def _hook_keys(layer: nn.Module) -> list[int]:
    return [key for key, hook in layer._forward_pre_hooks.items() if hook is _contiguous_input]


def contiguous_layer_inputs(model: nn.Module, enable: bool = True) -> list[str]:
    """Feed the first layer of each of the model's layer stacks contiguous hidden states (a forward pre-hook);
    ``enable=False`` removes the hooks. Returns the paths of the layers changed now (idempotent).

    Whisper's encoder adds its positions to the convolution output transposed to (batch, time, channels),
    so its hidden states keep the transposed strides through every layer: each residual add then mixes
    two layouts (about 1 ms instead of 0.1 ms for a 30 s window at width 512 on a 2-core CPU) and each
    LayerNorm copies its input first. One copy before the first layer gives every later op contiguous
    tensors. The values are the same bit for bit; it helps dense and compressed models alike. Like
    `fuse_activations` it is not saved: apply it again after `adaptwin.load`.
    """
    adapter = get_architecture(model_type_of(model))
    changed = []
    for stack in adapter.layer_stacks(model).values():
        layers = model.get_submodule(stack)
        if len(layers) == 0:
            continue
        path, layer = f"{stack}.0", layers[0]
        keys = _hook_keys(layer)
        if enable and not keys:
            layer.register_forward_pre_hook(_contiguous_input, with_kwargs=True)
            changed.append(path)
        elif not enable and keys:
            for key in keys:
                del layer._forward_pre_hooks[key]
                layer._forward_pre_hooks_with_kwargs.pop(key, None)
            changed.append(path)
    return changed


_WEIGHT_AND_BIAS = ("weight", "bias")


class GemvLinear(nn.Linear):
    """An `nn.Linear` (the same parameters and state dict) whose CPU calls with few rows of x (`gemv_rows`) and no
    gradient to record go through ``torch.ops.adaptwin.rank_linear`` with the weight as its one fp factor: the
    CPU kernels' decoding path, a streaming GEMV (csrc/cpu/fp_gemv.h). x, weight and bias must share the dtype
    (float32 or bfloat16); rows up to `adaptwin.ops.rank_linear.gemv_rows` (4 for small weights, 8 / 6 for a
    float32 / bfloat16 weight of `GEMV_LARGE` elements or more, such as an output head: the timings are
    beside it). Every other call is `F.linear`. On the 2-core CPU (2 threads, medians), Whisper-tiny's 51865 x
    384 output head, one row: 1.1 ms in bfloat16 (36 GB/s) against oneDNN's 2.8 ms (its GEMV builds its
    primitive per call), 2.8 ms in float32 against MKL's sgemv 8.5 ms (10 GB/s); the same error against
    float64 as `F.linear` (1.66e-3 in bfloat16, the output's rounding).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = parameters_of(self, _WEIGHT_AND_BIAS)
        if takes_gemv(x, (w, b), gemv_rows(w)):
            return run_rank_linear(x, w, None, "fp", 0, list(w.shape), *ABSENT, b)
        return F.linear(x, w, b)


def _path_of(model: nn.Module, module: nn.Module) -> str | None:
    return next((path for path, m in model.named_modules() if m is module), None)


def gemv_output_head(model: nn.Module, enable: bool = True) -> str | None:
    """Make the model's output head (``get_output_embeddings()``: Whisper's ``proj_out``, GPT-2's and Llama's
    ``lm_head``) a `GemvLinear`, or back (``enable=False``); returns its path when it changed, else None.

    Only a plain `nn.Linear` head changes (its class, not its parameters: a tie to the token table stays, the
    state dict and `adaptwin.save` are unchanged); a packed head (`quantize_embeddings`) already runs the
    CPU kernels. Like `fuse_activations` it is not saved: apply it again after `adaptwin.load`.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if enable and type(head) is nn.Linear:
        head.__class__ = GemvLinear
        return _path_of(model, head)
    if not enable and type(head) is GemvLinear:
        head.__class__ = nn.Linear
        return _path_of(model, head)
    return None


def gemv_linears(model: nn.Module, enable: bool = True) -> list[str]:
    """Make every plain `nn.Linear` of the model a `GemvLinear`, or back (``enable=False``); returns the paths
    that changed. `gemv_output_head` for every linear layer: a decoding step's one row then takes the CPU
    kernels' GEMV in each of them (a compressed model's rank-space projections, a dense model's projections and
    FFN matrices), the rest `F.linear`. Not saved either."""
    changed = []
    for path, m in model.named_modules():
        if enable and type(m) is nn.Linear:
            m.__class__ = GemvLinear
            changed.append(path)
        elif not enable and type(m) is GemvLinear:
            m.__class__ = nn.Linear
            changed.append(path)
    return changed


def prepare_inference(model: nn.Module, enable: bool = True) -> dict[str, object]:
    """`fuse_activations`, `contiguous_layer_inputs`, `gemv_output_head` and `gemv_linears` at once
    (``enable=False``: all undone); returns what each changed: ``{"fused": [...], "contiguous": [...],
    "gemv_head": path or None, "gemv": [...]}`` ("gemv": the other linear layers made `GemvLinear`). None of it
    is saved; the model computes the same function (fusion and the GEMV change only the rounding, the
    contiguous inputs not even that)."""
    fused = fuse_activations(model) if enable else unfuse_activations(model)
    return {"fused": fused, "contiguous": contiguous_layer_inputs(model, enable),
            "gemv_head": gemv_output_head(model, enable), "gemv": gemv_linears(model, enable)}
