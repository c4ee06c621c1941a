"""Op arguments built from a module's packed buffers, kept between calls while the buffers stay the same.

A batch-1 decoding step calls every compressed layer once, and each call is a few microseconds of kernel:
rebuilding the op's argument tuple per call (buffer lookups by name, the format's scales, the shape list)
took 0.9 us of a 9.4 us call of a 384-wide NF4 `QuantLowRankLinear`, and 2.75 us of PQM's 24.8 us one.
`PackedArgs` keeps the tuple while every buffer it was built from is the same tensor object, and, where a
tensor in it was computed from them (double-quantised scales), at the same version: a buffer replaced
behind `nn.Module`'s back (``module._buffers[name] = t``, as accelerate does), or such a source written in
place (``copy_``, ``load_state_dict``), makes it build anew. Modules that keep one drop it in
`_apply` (``.to``, ``.half``) and on state-dict loading (`DropsPackedArgs`), so a replaced buffer is not kept
alive. Under `torch.compile` nothing is kept or reused (Dynamo traces the plain build).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from adaptwin.ops.backends import _is_compiling

# Rows of x above which a packed module's CPU inference call decodes its factors whole and runs GEMMs (the
# op's own crossover for quantised factors: csrc/cpu/rank_linear_fused.h, kFusedMaxRows).
MIN_BATCHED_ROWS = 32


def batched_inference(module: nn.Module, x: torch.Tensor, min_rows: int = MIN_BATCHED_ROWS) -> bool:
    """Whether a call of packed ``module`` on ``x`` is a batched CPU inference call: more than ``min_rows`` rows,
    on the CPU, eager, and no gradient to record (grad mode off, or neither x nor a parameter requires one).
    Such calls may decode the module's factors whole and multiply with ATen GEMMs (one per product, the fp
    LoRA directions folded in) instead of calling the op once per storage format."""
    if x.dim() == 0 or x.numel() <= min_rows * max(x.shape[-1], 1):
        return False  # (first: decoding calls leave here)
    if x.device.type != "cpu" or _is_compiling():
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(
        p.requires_grad for p in module._parameters.values() if p is not None)))


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a batched call's GEMMs run in for x of ``dtype``, as the op's batched path chooses it: x's own
    for float32, bfloat16 (AVX512-BF16 GEMMs) and float64; float32 otherwise (CPU fp16 GEMMs are slow)."""
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32


def derived(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` computed outside ``torch.inference_mode`` (a tensor derived from a module's buffers, e.g.
    double-quantised scales): an inference tensor cannot be kept (`PackedArgs.put`), so under
    ``inference_mode``, as ``generate`` runs, it would be recomputed on every call (tens of microseconds per
    factor). From inference-tensor buffers (a model built under inference_mode) it is still not kept."""
    if _is_compiling() or not torch.is_inference_mode_enabled():  # (Dynamo breaks on the second)
        return fn(*args)
    with torch.inference_mode(False):
        return fn(*args)


class PackedArgs:
    """One cached argument tuple and the (name, tensor, version or None) of each buffer it came from, kept
    as one pair (one assignment: a call on another thread never sees one half of an update)."""

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._kept: tuple | None = None

    @property
    def kept(self) -> bool:
        return self._kept is not None

    def sources_of(self, args: tuple) -> tuple | None:
        """The (name, tensor, version or None) of each buffer ``args`` came from, if ``args`` is the tuple kept
        now, else None."""
        kept = self._kept
        return kept[0] if kept is not None and kept[1] is args else None

    def get(self, buffers: Mapping[str, torch.Tensor | None]) -> tuple | None:
        """The kept arguments if every source buffer in ``buffers`` is unchanged, else None."""
        kept = self._kept
        if kept is None or _is_compiling():
            return None
        for name, t, version in kept[0]:
            if buffers.get(name) is not t or (version is not None and t._version != version):
                return None
        return kept[1]

    def put(self, buffers: Mapping[str, torch.Tensor | None], names: Iterable[str], args: tuple) -> tuple:
        """Keep ``args``, built from ``buffers[name]`` for ``names``, and return them. Not kept under
        `torch.compile`, nor when a tensor computed from the buffers (double-quantised scales) is an inference
        tensor (made under `torch.inference_mode`): autograd could not save it for a later backward through
        the op (training PQM's LoRA after a generate())."""
        if _is_compiling():
            return args
        sources = tuple((name, buffers[name]) for name in names)
        derived = [a for a in args if isinstance(a, torch.Tensor) and not any(a is t for _, t in sources)]
        if derived and any(t.is_inference() for t in (*derived, *(t for _, t in sources))):
            return args  # (an inference tensor has no version counter to watch)
        # versions matter only where a tensor was computed from the buffers: the buffers themselves are
        # passed as they are, so writes into them reach the op anyway
        self._kept = (tuple((name, t, t._version if derived else None) for name, t in sources), args)
        return args


class KeptCall:
    """A packed module's whole batch-1 CPU inference call of `rank_linear` (one op call, or several whose outputs
    add up), kept between calls and run by ``adaptwin._C.call_rank_linear_kept``, which checks in C++ that each
    buffer and parameter it was built from is still the module's (and each derived source at its version, as
    `PackedArgs` does) before calling the op. A whole 384-wide NF4 `QuantLowRankLinear` took 8.5 us a call
    here against the op's 5.0 us from Python (`benchmarks.rank_linear_speed`, ``nf4_module`` and
    ``nf4_no_grad``), most of the difference its Python rebuilding and checking the arguments factor by
    factor; kept, the module takes 6.2 us.

    ``kept`` is ``None`` or ``(entry, (max_rows, sources, calls, layout, parsed))``, documented at the entry
    point (csrc/cpu/kept_calls.cpp): the calls' outputs added, or, for a `QuantLinear` whose LoRA directions
    stay in fp, placed side by side in each head or fed from each head's columns; ``parsed`` is
    ``adaptwin._C.parse_rank_linear_kept``'s capsule of the calls and layout, read once (without it, where the
    extension lacks that function, the entry reads them on each call). `run` calls
    ``entry(x, kept[1])``, which answers NotImplemented for anything it does not take (more than ``max_rows``
    rows, a changed source, another device, a gradient to record): the module then takes its general path,
    which keeps the call again where it can."""

    __slots__ = ("kept",)

    def __init__(self) -> None:
        self.kept: tuple | None = None

    def clear(self) -> None:
        self.kept = None

    def __reduce__(self) -> tuple:
        """Copied (`copy.deepcopy`) or pickled empty: the kept call belongs to this module's objects (and its
        capsule cannot be pickled); the copy keeps its own on its first inference call."""
        return KeptCall, ()

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        """The kept call on ``x``, or None where nothing is kept, under `torch.compile` (the module's own code is
        traced), or where the entry point does not take the call."""
        kept = self.kept
        if kept is None or _is_compiling():
            return None
        y = kept[0](x, kept[1])
        return None if y is NotImplemented else y

    def put(self, module: nn.Module, factors: Iterable[tuple[PackedArgs, tuple]], params: Iterable[str],
            calls: tuple[tuple, ...], max_rows: int, layout: tuple | None = None, buffers: Iterable[str] = ()) -> None:
        """Keep ``calls`` (each the op's 11 arguments after x), built from ``factors``' arguments (pairs of a
        `PackedArgs` and the arguments it gave, which must be the ones it keeps) and from ``module``'s
        parameters named ``params`` and other buffers named ``buffers`` (a missing one as None), with ``layout``
        (None: the outputs added). Nothing is kept without the native entry point, under `torch.compile`, or
        for tensors off the CPU."""
        from adaptwin.ops.backends import FAST

        entry = FAST.get("rank_linear_kept")
        if entry is None or _is_compiling():
            return
        if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for call in (*calls, layout or ()) for a in call):
            return
        own, parameters = module._buffers, module._parameters
        sources = [(own, name, own.get(name), None) for name in buffers]
        for packed, args in factors:
            kept = packed.sources_of(args)
            if kept is None:
                return
            sources += [(own, name, t, version) for name, t, version in kept]
        sources += [(parameters, name, parameters.get(name), None) for name in params]
        kept = (max_rows, tuple(sources), calls, layout)
        # the calls read once, into a capsule the tuple ends with. Its tensors are then held from C++, where
        # Python's cycle collector does not see them (as with any C++ holder of a tensor): only tensors without
        # attributes of their own, which could refer back to the module and keep it alive, are held that way
        parse = FAST.get("parse_rank_linear_kept")
        held = [a for call in (*calls, layout or ()) for a in call if isinstance(a, torch.Tensor)]
        parsed = parse(kept) if parse is not None and not any(t.__dict__ for t in held) else NotImplemented
        self.kept = (entry, kept if parsed is NotImplemented else (*kept, parsed))


class DropsPackedArgs(nn.Module):
    """A module holding `PackedArgs` or `KeptCall`: they are dropped before `_apply` and state-dict loading
    replace or rewrite its buffers. Subclasses list them in `_packed_args_kept`."""

    def _packed_args_kept(self) -> Iterable[PackedArgs | KeptCall]:
        raise NotImplementedError

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        for kept in self._packed_args_kept():
            kept.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        for kept in self._packed_args_kept():
            kept.clear()
        super()._load_from_state_dict(*args, **kwargs)
