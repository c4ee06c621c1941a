"""Low-rank modules whose factors live packed (NF4 / int8), with a fake-quantised training state.

Each module has two states:

* **master** (quantisation-aware training, Eq. 10): the factors are fp `nn.Parameter`s with the *same
  names and shapes* as in the module it replaces (``weight``, ``in_factor``, ``out_factor``), so the
  layer-wise fine-tuner, its LoRA masks and its checkpoints work unchanged. The forward pass uses
  ``dequantize(quantize(W))`` of those factors, with a straight-through gradient to W.
* **packed** (after `pack`, and what `adaptwin.load` builds): the quantised directions are uint8/int8
  buffers plus float32 scales; the fp master copies are gone. LoRA directions kept in higher precision
  are a small fp `nn.Parameter` ``<factor>_lora``.

Both states call the one op `torch.ops.adaptwin.rank_linear` in the same order, and the packed codes
dequantise bit for bit to the values the master module last computed with. The outputs agree to float32
rounding, not bit for bit: the packed factors' CPU kernels decode in registers and sum in another order
than the master's GEMMs on the fake-quantised factors.

Batched CPU inference calls (more than `MIN_BATCHED_ROWS` rows of x, no gradient to record, eager) of packed
modules decode each factor once into its full float32 (k, n) matrix, quantised and fp LoRA directions in
their places (`adaptwin.ops.rank_linear.dequantize_factor`, the CPU kernels' own decoding), and run the
module's products as one GEMM each, as its fp32 counterpart does: the op, which takes one format per
factor, would need two calls (quantised and fp directions), an add and, for q / k / v, a concatenation,
and its small-rank GEMM (rank l, e.g. 150 x 9 x 1024) is slow. `QuantLowRankLinear` then also runs a fused
activation (`adaptwin.fuse_activations`) inside its second GEMM, as `LowRankLinear` does.

Every factor is handled *direction-major* (k, n): one row per rank direction (for an output factor,
stored (out, k), that is its transpose), so quantisation blocks run along a single direction.
Directions are grouped per head: ``blocks`` groups of ``width`` directions, the first ``rank`` of each
spectral, the rest LoRA (the layout `TwinAttention` and `LowRankLinear` use).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptwin.compressors.packed_args import (
    MIN_BATCHED_ROWS,
    DropsPackedArgs,
    KeptCall,
    PackedArgs,
    batched_inference,
    derived,
    gemm_dtype,
)
from adaptwin.ops.activation import ACTIVATIONS, activate, linear_act
from adaptwin.ops.rank_linear import ABSENT, dequantize_factor
from adaptwin.ops.rank_linear import run_rank_linear as rank_linear
from adaptwin.quant import QuantFormat


class _FakeQuant(torch.autograd.Function):
    """dequantize(quantize(w)) forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
        return fmt.dequantize(fmt.quantize(w), tuple(w.shape), w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quantize(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The values ``w`` takes once packed in ``fmt`` (same dtype), with a straight-through gradient."""
    return _FakeQuant.apply(w, fmt)


class _Factor:
    """One factor: its direction-major shape (k, n), how it is stored, which directions are quantised."""

    def __init__(self, name: str, k: int, n: int, transposed: bool, blocks: int, width: int,
                 rank: int | None, quantize_lora: bool) -> None:
        if blocks * width != k:
            raise ValueError(f"factor {name}: {blocks} blocks of {width} directions do not make its {k} directions")
        self.name, self.k, self.n, self.transposed = name, k, n, transposed
        self.blocks, self.width = blocks, width
        # rank None: no spectral/LoRA split is known (all directions are quantised)
        self.rank = width if rank is None or quantize_lora else rank
        self.lora = width - self.rank  # LoRA directions per block kept in higher precision
        pos = torch.arange(k, device="cpu") % width  # index tensors stay on the CPU, even under a meta context
        self.idx_q = torch.nonzero(pos < self.rank).flatten()  # (blocks·rank,)
        self.idx_l = torch.nonzero(pos >= self.rank).flatten()  # (blocks·lora,)

        self._names: tuple | None = None
        self.lora_name = f"{name}_lora"
        self.packed_args = PackedArgs()  # the op arguments of the packed state

    def buffer_names(self, fmt: QuantFormat) -> tuple[tuple[str, str], ...]:
        """``(key, buffer name)`` of the packed quantised directions in ``fmt``, worked out once."""
        if self._names is None or self._names[0] is not fmt:
            self._names = (fmt, tuple((key, f"{self.name}_{key}") for key in fmt.layout(tuple(self.q_shape))))
        return self._names[1]

    @property
    def split(self) -> bool:
        return self.lora > 0

    @property
    def q_shape(self) -> list[int]:
        return [self.blocks * self.rank, self.n]

    @property
    def l_shape(self) -> list[int]:
        return [self.blocks * self.lora, self.n]

    def master_shape(self) -> tuple[int, int]:
        return (self.n, self.k) if self.transposed else (self.k, self.n)


class _QuantModule(DropsPackedArgs):
    """Shared storage logic: master Parameters or packed buffers for each `_Factor`."""

    def _setup(self, fmt: QuantFormat, factors: list[_Factor], packed: bool) -> None:
        self.fmt = fmt
        self._factors = {f.name: f for f in factors}
        self._call = KeptCall()  # the packed state's whole batch-1 call, where it is one op call or a sum of two
        self.packed = packed
        for f in factors:
            if packed:
                self._make_packed(f, None)
            else:
                self.register_parameter(f.name, nn.Parameter(torch.empty(f.master_shape())))

    def _make_packed(self, f: _Factor, stored: dict[str, torch.Tensor] | None, lora: torch.Tensor | None = None,
                     device: Any = None, dtype: torch.dtype | None = None) -> None:
        if f.rank:
            for key, (shape, dt) in self.fmt.layout(tuple(f.q_shape)).items():
                value = stored[key] if stored is not None else torch.empty(shape, dtype=dt, device=device)
                self.register_buffer(f"{f.name}_{key}", value)
        if f.split:
            value = lora if lora is not None else torch.empty(f.l_shape, device=device, dtype=dtype)
            self.register_parameter(f"{f.name}_lora", nn.Parameter(value))

    def _direction_major(self, f: _Factor) -> torch.Tensor:
        w = getattr(self, f.name)
        return w.t() if f.transposed else w  # (k, n)

    def _parts(self, f: _Factor) -> tuple[tuple | None, torch.Tensor | None]:
        """``(op arguments of the quantised directions or None, fp LoRA directions (k_l, n) or None)``."""
        if self.packed:
            return (self._packed_args(f) if f.rank else None), (self._parameters[f.lora_name] if f.split else None)
        w = self._direction_major(f)  # (k, n)
        if not f.split:
            return (fake_quantize(w, self.fmt), None, "fp", 0, f.q_shape), None
        idx_q, idx_l = f.idx_q.to(w.device), f.idx_l.to(w.device)
        q = (fake_quantize(w[idx_q], self.fmt), None, "fp", 0, f.q_shape) if f.rank else None
        return q, w[idx_l]

    def _batched(self, x: torch.Tensor) -> bool:
        """Whether this call takes the whole-factor GEMM path (see the module docstring). The forwards test the
        row count first, inline: a decoding call is a few microseconds, and a method call costs a few tenths."""
        return self.packed and batched_inference(self, x, MIN_BATCHED_ROWS)

    def _whole(self, f: _Factor, dtype: torch.dtype) -> torch.Tensor:
        """``f``'s full direction-major (k, n) matrix in ``dtype``: its quantised directions decoded, its fp LoRA
        directions in their places."""
        q, lora = self._parts(f)
        if lora is None:
            w = dequantize_factor(*q)
        elif q is None:
            w = lora.float()
        else:  # each block's `rank` spectral directions decoded into place, then its `lora` LoRA ones
            w = dequantize_factor(*q, out=torch.empty((f.k, f.n)), group=f.rank, stride=f.width)
            w.view(f.blocks, f.width, f.n)[:, f.rank:] = lora.view(f.blocks, f.lora, f.n)
        return w if w.dtype == dtype else w.to(dtype)

    def _packed_args(self, f: _Factor) -> tuple:
        """The op arguments of ``f``'s packed directions (kept between calls: `PackedArgs`)."""
        buffers = self._buffers
        q = f.packed_args.get(buffers)
        if q is None:
            names = f.buffer_names(self.fmt)
            stored = {key: buffers[name] for key, name in names}
            q = (stored["qweight"], derived(self.fmt.scale, stored), self.fmt.kind, self.fmt.blocksize, f.q_shape)
            f.packed_args.put(buffers, (name for _, name in names), q)
        return q

    def _bias(self) -> torch.Tensor | None:
        """``self.bias`` without `nn.Module.__getattr__` (0.6 us a call here)."""
        params = self._parameters
        return params["bias"] if "bias" in params else self.bias

    def _packed_args_kept(self) -> Iterable[PackedArgs | KeptCall]:
        call = self.__dict__.get("_call")
        return [f.packed_args for f in self.__dict__.get("_factors", {}).values()] + ([call] if call else [])

    def _keep_call(self, parts: list[tuple[_Factor, tuple | None]], params: list[str], calls: list[tuple],
                   layout: tuple | None = None) -> None:
        """After a batch-1 call of the packed state made as ``calls`` (with ``layout``, `KeptCall`; None: summed in
        order) from the quantised directions ``parts`` ((factor, its op arguments)) and the parameters ``params``:
        keep it where no gradient is recorded, so the next call runs it from C++ without rebuilding it."""
        if self.packed and not torch.is_grad_enabled():
            self._call.put(self, [(f.packed_args, q) for f, q in parts if q is not None], params, tuple(calls),
                           MIN_BATCHED_ROWS, layout)

    @torch.no_grad()
    def pack(self) -> None:
        """Quantise the master factors into packed buffers (bit-identical to what fake quantisation used)."""
        if self.packed:
            return
        for f in self._factors.values():
            w = self._direction_major(f).detach()
            device, dtype = w.device, w.dtype
            stored = self.fmt.quantize(w[f.idx_q.to(device)] if f.split else w) if f.rank else None
            lora = w[f.idx_l.to(device)].clone() if f.split else None
            del self._parameters[f.name]
            self._make_packed(f, stored, lora, device, dtype)
        self.packed = True

    def storage(self) -> tuple[int, int]:
        """``(logical parameters, bytes stored)``: the factors' full (k, n) counts plus the bias; every
        stored tensor's bytes (codes, scales, fp LoRA directions, bias)."""
        params = sum(f.k * f.n for f in self._factors.values())
        bias = getattr(self, "bias", None)
        params += bias.numel() if bias is not None else 0
        return params, sum(t.numel() * t.element_size() for t in self.state_dict().values())


class QuantLinear(_QuantModule):
    """An `nn.Linear` that holds one rank-space factor of `TwinAttention` (or BERT's output factor).

    Args:
        in_features, out_features, bias: as `nn.Linear`.
        role: ``"in"``: the weight (k, in) maps into rank space, one row per direction (q/k/v
            projections); ``"out"``: the weight (out, k) maps out of it, one column per direction.
        blocks, width, rank: directions come in ``blocks`` heads of ``width``, the first ``rank`` of
            each spectral, the rest LoRA (``rank=None``: all quantised).
        fmt: the storage format; quantize_lora: quantise the LoRA directions too (else keep them fp).
        packed: build in the packed state (empty buffers, for loading) instead of the master state.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, role: str, blocks: int, width: int,
                 rank: int | None, fmt: QuantFormat, quantize_lora: bool, packed: bool) -> None:
        super().__init__()
        if role not in ("in", "out"):
            raise ValueError(f"QuantLinear role must be 'in' or 'out', got {role!r}")
        self.in_features, self.out_features, self.role = in_features, out_features, role
        k, n = (out_features, in_features) if role == "in" else (in_features, out_features)
        self._setup(fmt, [_Factor("weight", k, n, role == "out", blocks, width, rank, quantize_lora)], packed)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._call.run(x)
        if y is not None:
            return y
        f = self._factors["weight"]
        bias = self._bias()
        if x.dim() and x.numel() > MIN_BATCHED_ROWS * x.shape[-1] and self._batched(x):
            dt = gemm_dtype(x.dtype)
            w = self._whole(f, dt)  # (k, n): in-role (out, in), out-role (in, out)
            b = bias.to(dt) if bias is not None else None
            y = F.linear(x.to(dt), w if self.role == "in" else w.t(), b)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        q, lora = self._parts(f)
        if not f.split:
            call = (*q, *ABSENT, bias) if self.role == "in" else (*ABSENT, *q, bias)
            y = rank_linear(x, *call)
            self._keep_call([(f, q)], ["bias"], [call])
            return y
        lora_args = (lora, None, "fp", 0, f.l_shape)
        if self.role == "in":
            parts = []
            if q is not None:
                parts.append(rank_linear(x, *q, *ABSENT, None).unflatten(-1, (f.blocks, f.rank)))  # (..., H, r)
            lora_h = rank_linear(x, *lora_args, *ABSENT, None)  # (..., H·l)
            parts.append(lora_h.unflatten(-1, (f.blocks, f.lora)))
            y = torch.cat(parts, -1).flatten(-2)  # (..., H·width), each head's spectral then LoRA directions
            if bias is not None:  # in x's dtype, as the op and the batched path return it
                y = y + bias if bias.dtype == y.dtype else (y + bias).to(y.dtype)
            if q is not None:  # kept: the two calls' outputs side by side in each head, then the bias
                self._keep_call([(f, q)], ["bias", f.lora_name], [(*q, *ABSENT, None), (*lora_args, *ABSENT, None)],
                                ("in", f.blocks, (f.rank, f.lora), bias))
            return y
        h = x.unflatten(-1, (f.blocks, f.width))  # (..., H, width)
        y = rank_linear(h[..., f.rank:].flatten(-2), *ABSENT, *lora_args, None if q else bias)
        if q is not None:
            y = rank_linear(h[..., :f.rank].flatten(-2), *ABSENT, *q, bias) + y
            # kept: each head's spectral columns into the quantised call, its LoRA ones into the fp one, added
            self._keep_call([(f, q)], ["bias", f.lora_name], [(*ABSENT, *q, bias), (*ABSENT, *lora_args, None)],
                            ("out", f.blocks, (f.rank, f.lora), None))
        return y

    def extra_repr(self) -> str:
        f = self._factors["weight"]
        return (f"in={self.in_features}, out={self.out_features}, role={self.role}, {self.fmt.kind}"
                f"(blocksize={self.fmt.blocksize}, double_quant={self.fmt.double_quant}), "
                f"quantised directions {f.blocks}x{f.rank}, fp {f.blocks}x{f.lora}, packed={self.packed}")


class QuantLowRankLinear(_QuantModule):
    """`LowRankLinear` (y = x·Uᵀ·Vᵀ + b) with U (k, in) and V (out, k) quantised; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, rank: int, lora_rank: int = 0, bias: bool = True, *,
                 fmt: QuantFormat, quantize_lora: bool, packed: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.lora_rank = rank, lora_rank
        k = rank + lora_rank
        self._setup(fmt, [_Factor("in_factor", k, in_features, False, 1, k, rank, quantize_lora),
                          _Factor("out_factor", k, out_features, True, 1, k, rank, quantize_lora)], packed)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.activation: str | None = None  # see LowRankLinear; set by adaptwin.fuse_activations

    fusable_activations = tuple(ACTIVATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._call.run(x)
        if y is not None:
            return y if self.activation is None else activate(y, self.activation)
        if x.dim() and x.numel() > MIN_BATCHED_ROWS * x.shape[-1] and self._batched(x):
            return self._whole_gemms(x)
        bias = self._bias()
        fa, fb = self._factors["in_factor"], self._factors["out_factor"]
        (qa, la), (qb, lb) = self._parts(fa), self._parts(fb)
        calls = []
        if qa is not None:
            calls.append((*qa, *qb, bias))
        if la is not None:  # LoRA directions in higher precision: a second rank-l product, added
            calls.append((la, None, "fp", 0, list(la.shape), lb, None, "fp", 0, list(lb.shape), None if qa else bias))
        y = rank_linear(x, *calls[0])
        if len(calls) > 1:
            y = y + rank_linear(x, *calls[1])
        self._keep_call([(fa, qa), (fb, qb)], ["bias", fa.lora_name, fb.lora_name], calls)
        return y if self.activation is None else activate(y, self.activation)

    def _whole_gemms(self, x: torch.Tensor) -> torch.Tensor:
        """The batched path: x·Uᵀ, then ·Vᵀ + b with the fused activation in the same GEMM."""
        bias = self._bias()
        dt = gemm_dtype(x.dtype)
        a = self._whole(self._factors["in_factor"], dt)  # (k, in)
        b = self._whole(self._factors["out_factor"], dt).t()  # (out, k)
        bias_t = bias.to(dt) if bias is not None else None
        h = F.linear(x.to(dt), a)
        y = F.linear(h, b, bias_t) if self.activation is None else linear_act(h, b.contiguous(), bias_t,
                                                                              self.activation)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, lora_rank={self.lora_rank}, "
                f"{self.fmt.kind}(blocksize={self.fmt.blocksize}, double_quant={self.fmt.double_quant}), "
                f"lora {'quantised' if not self._factors['in_factor'].split else 'fp'}, packed={self.packed}"
                + (f", activation={self.activation}" if self.activation else ""))
