"""Block-wise NF4 (QLoRA's 4-bit NormalFloat), bit-compatible with bitsandbytes' ``quant_type="nf4"``.

Byte layout of a tensor W of n elements, blocksize b (default 64), taken flat in row-major order:

    packed   uint8 (ceil(n/2),)   element 2i in the HIGH nibble, 2i+1 in the LOW nibble of byte i; an
                                  odd n pads the last low nibble with 7 (the code of 0.0). Nibble value
                                  = index into `NF4_CODE`.
    absmax   float32 (ceil(n/b),) max |W| of each block of b consecutive elements (the last may be short).
    W[j] = NF4_CODE[nibble j] * absmax[j // b]   (computed in float32, then cast)

Double quantisation (QLoRA §3, bitsandbytes ``compress_statistics=True``) replaces ``absmax`` by

    qabsmax  uint8 (ceil(n/b),)   8-bit codes (index into `dynamic_map`) of absmax - offset, in blocks of
                                  d = 256 consecutive scales
    absmax2  float32 (ceil(ceil(n/b)/d),)  max |absmax - offset| of each such block
    offset   float32 (1,)          mean of absmax
    absmax[k] = DYNAMIC[qabsmax[k]] * absmax2[k // d] + offset

which is what bitsandbytes stores in ``QuantState.absmax`` / ``state2.absmax`` / ``offset`` (its packed
tensor is the same bytes shaped (ceil(n/2), 1)). Quantisation rounds to the nearest code, ties to the
lower one (bitsandbytes' ``bucketize`` over the midpoints); the scaled value is ``w * (1 / absmax)``
for full blocks and ``w / absmax`` for a short last block, as bitsandbytes computes it, so the NF4 bytes
and absmax equal bitsandbytes' (tests/test_quant.py). The 8-bit scale codes are the exact nearest ones;
bitsandbytes' CPU kernel picks the next code for ~0.2 % of scales (15 of 9216 on a 384x1536 matrix,
each 6e-6 to 2e-5 farther from the value), so those bytes can differ while any given bytes dequantise
to the same values in both.
"""

from __future__ import annotations

import functools

import torch

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1] (QLoRA, appendix E).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
DOUBLE_BLOCKSIZE = 256


def _table(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A small constant table on ``device``, built per call rather than cached: a cached real tensor would
    leak into traced graphs (torch.compile / opcheck's fake tensors refuse it). Inside a CUDA graph capture,
    where a copy from pageable host memory is refused, each value is written by a fill on the device."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        table = torch.empty(len(values), dtype=torch.float32, device=device)
        for i, value in enumerate(values):
            table[i].fill_(value)
        return table
    return torch.tensor(values, dtype=torch.float32, device=device)


def _code(device: torch.device) -> torch.Tensor:
    return _table(NF4_CODE, device)


@functools.cache
def _dynamic_values() -> tuple[float, ...]:
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) with the
    # same float32 arithmetic (float64 products differ in 30 of the 256 entries by up to 7e-9), sorted.
    data: list[float] = []
    exp_bits, non_sign = 7, 7
    for i in range(exp_bits):
        items = int(2 ** (i + non_sign - exp_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(exp_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(exp_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return tuple(sorted(data))


_DYNAMIC_VALUES = _dynamic_values()  # computed at import: torch.compile cannot trace its tensor -> list steps


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 float32 values, sorted), used for double quantisation."""
    return _table(_DYNAMIC_VALUES, torch.device(device))


def _blocks(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scaled in [-1, 1], absmax (blocks,))`` of flat float32 ``w``, with bitsandbytes' arithmetic."""
    n = w.numel()
    full = n - n % blocksize
    body = w[:full].view(-1, blocksize)  # (blocks, b)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if full < n:
        tail_max = w[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(w[full:] / tail_max, -1, 1)])
    return scaled, absmax


def quantize(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``w`` (any shape, floating) to NF4.

    Returns:
        ``(packed uint8 (ceil(n/2),), absmax float32 (ceil(n/blocksize),))``; see the module docstring.
    """
    _check_blocksize(blocksize)
    flat = w.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise ValueError("cannot quantise an empty tensor")
    scaled, absmax = _blocks(flat, blocksize)
    if scaled.numel() % 2:  # an odd count pads a 0.0 (code 7), as bitsandbytes does
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    code = _code(flat.device)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)  # (n,) nearest code, ties low
    return (q[0::2] << 4) | q[1::2], absmax


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit code indices (int64, (numel,)) of ``packed``: high nibble first."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 1) // 2:
        raise ValueError(f"NF4 data must be uint8 of shape ({(numel + 1) // 2},) for {numel} values, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel].long()


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size,
               blocksize: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantisation: ``NF4_CODE[nibble] * absmax[block]`` in float32, cast to ``dtype``.

    Vectorised (one gather and one broadcast multiply; no loop over blocks).
    """
    n = 1
    for s in shape:
        n *= int(s)
    blocks = -(-n // blocksize)
    if absmax.shape != (blocks,):
        raise ValueError(f"NF4 absmax must have shape ({blocks},) for {n} values in blocks of {blocksize}, "
                         f"got {tuple(absmax.shape)}")
    values = _code(packed.device)[unpack(packed, n)]  # (n,) float32
    if blocks == 1:  # one block, however large its nominal size: no padding to allocate
        return (values * absmax.float()).view(*shape).to(dtype)
    pad = blocks * blocksize - n
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    out = (values.view(blocks, blocksize) * absmax.float()[:, None]).reshape(-1)[:n]
    return out.view(*shape).to(dtype)


def quantize_absmax(absmax: torch.Tensor, blocksize: int = DOUBLE_BLOCKSIZE
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantisation of NF4 scales: ``(qabsmax uint8 (m,), absmax2 float32 (ceil(m/blocksize),),
    offset float32 (1,))`` with 8-bit dynamic codes of ``absmax - mean(absmax)``."""
    _check_blocksize(blocksize)
    absmax = absmax.float()
    offset = absmax.mean()
    scaled, absmax2 = _blocks(absmax - offset, blocksize)
    code = dynamic_map(absmax.device)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return q, absmax2, offset.reshape(1)


def dequantize_absmax(qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                      blocksize: int = DOUBLE_BLOCKSIZE) -> torch.Tensor:
    """float32 NF4 scales from their double-quantised form (bitsandbytes: dequantize_blockwise + offset)."""
    m = qabsmax.numel()
    blocks = -(-m // blocksize)
    if qabsmax.dtype != torch.uint8 or absmax2.shape != (blocks,) or offset.numel() != 1:
        raise ValueError(f"double-quantised scales: need uint8 qabsmax, absmax2 of shape ({blocks},) and one "
                         f"offset; got {qabsmax.dtype}, {tuple(absmax2.shape)}, {offset.numel()} offset values")
    values = dynamic_map(qabsmax.device)[qabsmax.long()]
    pad = blocks * blocksize - m
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    out = (values.view(blocks, blocksize) * absmax2.float()[:, None]).reshape(-1)[:m]
    return out + offset.float().reshape(())


def _check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"NF4 blocksize must be an even whole number >= 2 (e.g. 64), got {blocksize!r}")
