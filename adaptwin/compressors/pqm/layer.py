"""`NF4LoRALinear`: a frozen NF4-packed ``nn.Linear`` plus a trainable low-rank (LoRA) update.

    y = x·Ŵᵀ + b + (alpha / r)·(x·Aᵀ)·B        Ŵ = dequantize(NF4(W)), frozen; A (r, in), B (r, out)

Both terms are calls of the one op `torch.ops.adaptwin.rank_linear`: the base as a single NF4 factor
(``a`` = the packed (out, in) weight, ``b`` = None; its codes are decoded per call, the dense matrix is
never kept), the update as two fp factors. The LoRA factors are stored *direction-major* like the op
takes them, one row per rank direction: ``lora_A`` (r, in) and ``lora_B`` (r, out) (PEFT's ``lora_B`` is
our ``lora_B.T``). ``lora_B`` starts at zero, so a fresh module computes exactly the NF4 base.

Batched CPU inference calls (more than 32 rows, no gradient to record: a Whisper encoder's frames under
``torch.no_grad``) form the weight instead, Ŵ + (alpha / r)·Bᵀ·A (decoded by the CPU kernels' own loops,
`adaptwin.ops.rank_linear.dequantize_factor`), and run one GEMM: the update's own rank-r GEMM to ``out``
columns is slow on the CPU (a product of inner size 4 runs far below the GEMM's rate).

Only ``lora_A`` and ``lora_B`` are Parameters; the packed codes, scales and the bias are buffers, so
``module.parameters()`` is exactly what speaker adaptation trains.
"""

from __future__ import annotations

from collections.abc import Iterable

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
from adaptwin.ops.rank_linear import ABSENT, dequantize_factor
from adaptwin.ops.rank_linear import run_rank_linear as rank_linear
from adaptwin.quant import QuantFormat


class NF4LoRALinear(DropsPackedArgs):
    """See the module docstring.

    Args:
        in_features, out_features, bias: as `nn.Linear`.
        rank: LoRA rank r (1-4 for PQM; any r >= 1 works here).
        scaling: alpha / r, the factor on the LoRA update.
        fmt: the base weight's storage format (NF4, `adaptwin.quant.QuantFormat`).

    Built empty (buffers uninitialised); fill it with `from_linear` or by loading a state dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, scaling: float,
                 fmt: QuantFormat, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"NF4LoRALinear rank must be a whole number >= 1, got {rank!r}")
        self.in_features, self.out_features, self.rank, self.scaling, self.fmt = (
            in_features, out_features, rank, float(scaling), fmt)
        for key, (shape, dt) in fmt.layout((out_features, in_features)).items():
            self.register_buffer(f"weight_{key}", torch.empty(shape, dtype=dt))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(rank, out_features, dtype=dtype))  # (r, out)
        self._base = PackedArgs()
        self._call = KeptCall()
        self._base_names = tuple(f"weight_{key}" for key in fmt.layout((out_features, in_features)))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int, scaling: float, fmt: QuantFormat,
                    generator: torch.Generator) -> NF4LoRALinear:
        """Pack ``linear``'s weight, copy its bias, draw A ~ U(±1/sqrt(in)) (PEFT's default), set B = 0."""
        w = linear.weight.detach()  # (out, in)
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, scaling, fmt)
        for key, value in fmt.quantize(w).items():
            setattr(new, f"weight_{key}", value)
        if linear.bias is not None:
            new.bias = linear.bias.detach().clone()
        bound = linear.in_features ** -0.5
        a = (torch.rand(rank, linear.in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        new.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        new.lora_B = nn.Parameter(torch.zeros(rank, linear.out_features, device=w.device, dtype=w.dtype))
        return new

    def base_args(self) -> tuple:
        """rank_linear's arguments for the frozen base as factor ``a`` (kept between calls: `PackedArgs`)."""
        buffers = self._buffers
        args = self._base.get(buffers)
        if args is None:
            stored = {name[len("weight_"):]: buffers[name] for name in self._base_names}
            args = self._base.put(buffers, self._base_names, (stored["qweight"], derived(self.fmt.scale, stored),
                                  self.fmt.kind, self.fmt.blocksize, [self.out_features, self.in_features]))
        return args

    def _packed_args_kept(self) -> Iterable[PackedArgs | KeptCall]:
        return [self.__dict__[name] for name in ("_base", "_call") if name in self.__dict__]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The frozen base Ŵ (out, in) as ``dtype`` (for tests and inspection; forward forms it only for a
        batched CPU inference call, per call)."""
        stored = {key: getattr(self, f"weight_{key}") for key in self.fmt.layout((self.out_features,
                                                                                   self.in_features))}
        return self.fmt.dequantize(stored, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._call.run(x)
        if y is not None:
            return y
        if x.dim() and x.numel() > MIN_BATCHED_ROWS * x.shape[-1] and batched_inference(self, x):
            dt = gemm_dtype(x.dtype)
            params, bias = self._parameters, self._buffers["bias"]
            w = dequantize_factor(*self.base_args())  # Ŵ (out, in), a fresh float32 tensor: updated in place
            w.addmm_(params["lora_B"].t().float(), params["lora_A"].float(), alpha=self.scaling)  # + s·Bᵀ·A
            y = F.linear(x.to(dt), w.to(dt), bias.to(dt) if bias is not None else None)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        base_args = self.base_args()
        base = (*base_args, *ABSENT, self._buffers["bias"])
        y = rank_linear(x, *base)  # (..., out)
        params = self._parameters
        lora = (params["lora_A"], None, "fp", 0, [self.rank, self.in_features],
                params["lora_B"], None, "fp", 0, [self.rank, self.out_features], None)
        y = torch.add(y, rank_linear(x, *lora), alpha=self.scaling)  # y + scaling·update in one op
        if not torch.is_grad_enabled():  # kept whole for the next inference call (`KeptCall`), run from C++
            self._call.put(self, [(self._base, base_args)], ["lora_A", "lora_B"], (base, lora), MIN_BATCHED_ROWS,
                           ("add", 1, (1.0, float(self.scaling)), None), buffers=["bias"])
        return y

    def storage(self) -> tuple[int, int]:
        """``(logical parameters, bytes stored)``: out·in + bias + r·(in + out); every stored tensor's bytes."""
        params = self.out_features * self.in_features + self.rank * (self.in_features + self.out_features)
        params += self.bias.numel() if self.bias is not None else 0
        return params, sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"{self.fmt.kind}(blocksize={self.fmt.blocksize}, double_quant={self.fmt.double_quant}), "
                f"lora_rank={self.rank}, scaling={self.scaling:g}")
