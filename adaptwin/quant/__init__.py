"""Quantised storage formats: pack, unpack and reference dequantisation. Knows no models.

`QuantFormat` names a format and its settings and turns a 2-D matrix into the named tensors it is stored
as (`quantize`), back (`dequantize`), and says which tensors those are without computing them (`layout`),
so an empty module can be built to load a save into. The byte layouts are in `nf4` and `int8`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptwin.quant import int8, nf4

FORMATS = ("nf4", "int8")


@dataclass(frozen=True)
class QuantFormat:
    """A quantised storage format.

    Args:
        kind: ``"nf4"`` (4-bit NormalFloat, two codes per byte) or ``"int8"`` (symmetric absmax).
        blocksize: elements per scale. NF4: an even number >= 2 (default 64). int8: 0 for one scale per
            row, or a block size > 0.
        double_quant: NF4 only: store the block scales themselves as 8-bit codes in blocks of
            ``nf4.DOUBLE_BLOCKSIZE`` (256) plus one offset (QLoRA's double quantisation).
    """

    kind: str
    blocksize: int
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.kind not in FORMATS:
            raise ValueError(f"quantisation format must be one of {FORMATS}, got {self.kind!r}")
        if self.kind == "nf4":
            nf4._check_blocksize(self.blocksize)
        elif isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 0:
            raise ValueError(f"int8 blocksize must be 0 (one scale per row) or a whole number > 0, "
                             f"got {self.blocksize!r}")
        if self.double_quant and self.kind != "nf4":
            raise ValueError("double_quant applies to NF4 block scales only; use kind='nf4' or double_quant=False")

    def layout(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{tensor name: (shape, dtype)}`` that a (rows, cols) matrix is stored as."""
        rows, cols = shape
        n = rows * cols
        if self.kind == "int8":
            groups = rows if self.blocksize == 0 else -(-n // self.blocksize)
            return {"qweight": ((rows, cols), torch.int8), "scale": ((groups,), torch.float32)}
        blocks = -(-n // self.blocksize)
        out = {"qweight": (((n + 1) // 2,), torch.uint8)}
        if self.double_quant:
            out.update(qabsmax=((blocks,), torch.uint8),
                       absmax2=((-(-blocks // nf4.DOUBLE_BLOCKSIZE),), torch.float32),
                       offset=((1,), torch.float32))
        else:
            out["absmax"] = ((blocks,), torch.float32)
        return out

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes a (rows, cols) matrix takes in this format, scales included."""
        total = 0
        for s, dtype in self.layout(shape).values():
            n = 1
            for d in s:
                n *= d
            total += n * dtype.itemsize
        return total

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of the 2-D matrix ``w`` (names as in `layout`)."""
        if w.dim() != 2:
            raise ValueError(f"QuantFormat.quantize takes a 2-D matrix, got shape {tuple(w.shape)}")
        if self.kind == "int8":
            q, scale = int8.quantize(w, self.blocksize)
            return {"qweight": q, "scale": scale}
        packed, absmax = nf4.quantize(w, self.blocksize)
        if not self.double_quant:
            return {"qweight": packed, "absmax": absmax}
        qabsmax, absmax2, offset = nf4.quantize_absmax(absmax)
        return {"qweight": packed, "qabsmax": qabsmax, "absmax2": absmax2, "offset": offset}

    def scale(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 scales the matmul op takes: int8 ``scale``; NF4 ``absmax`` (double-quantised ones
        expanded here: ceil(n/64) values, small next to the n/2 bytes of codes)."""
        if self.kind == "int8":
            return stored["scale"]
        if self.double_quant:
            return nf4.dequantize_absmax(stored["qabsmax"], stored["absmax2"], stored["offset"])
        return stored["absmax"]

    def dequantize(self, stored: dict[str, torch.Tensor], shape: tuple[int, int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (rows, cols) matrix ``stored`` holds, as ``dtype`` (dequantised in float32, then cast)."""
        return dequantize(stored["qweight"], self.scale(stored), self.kind, self.blocksize, shape, dtype)

    def dequantize_rows(self, stored: dict[str, torch.Tensor], shape: tuple[int, int], rows: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``rows`` (integer tensor, any shape) of the (R, C) matrix ``stored`` holds: ``(*rows.shape, C)``.

        Only the gathered rows' codes and scales are read (an embedding lookup touches a few hundred of
        30 522 rows), then decoded in one vectorised pass; the values equal ``dequantize(...)[rows]`` bit for
        bit (the same float32 products). Out-of-range rows raise ``IndexError`` as ``nn.Embedding`` does.
        """
        cols = int(shape[1])
        rows = rows.long()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= int(shape[0])):
            raise IndexError(f"row index out of range for a matrix of {shape[0]} rows")
        code = stored["qweight"]
        if self.kind == "int8" and self.blocksize == 0:
            return (code[rows].float() * stored["scale"][rows][..., None].float()).to(dtype)  # (..., C)
        pos = rows[..., None] * cols + torch.arange(cols, device=rows.device)  # (..., C) flat positions
        if self.kind == "int8":
            return (code[rows].float() * stored["scale"][pos // self.blocksize].float()).to(dtype)
        byte = code[pos >> 1]
        nibble = torch.where((pos & 1) == 0, byte >> 4, byte & 0xF).long()  # element 2i: high nibble
        return (nf4._code(rows.device)[nibble] * self.block_scales(stored, pos // self.blocksize)).to(dtype)

    def block_scales(self, stored: dict[str, torch.Tensor], blocks: torch.Tensor) -> torch.Tensor:
        """float32 scales of the NF4 blocks ``blocks`` (integer tensor, any shape): the stored absmax, or, double
        quantised, those blocks' scales decoded alone, as `nf4.dequantize_absmax` computes them (same bits)."""
        if self.double_quant:
            return (nf4.dynamic_map(blocks.device)[stored["qabsmax"][blocks].long()]
                    * stored["absmax2"][blocks // nf4.DOUBLE_BLOCKSIZE].float() + stored["offset"].float().reshape(()))
        return stored["absmax"][blocks].float()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "blocksize": self.blocksize, "double_quant": self.double_quant}


def dequantize(data: torch.Tensor, scale: torch.Tensor, kind: str, blocksize: int, shape: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantisation of one matrix from its codes and float32 scales (the op's building block)."""
    if kind == "nf4":
        return nf4.dequantize(data, scale, tuple(shape), blocksize, dtype)
    if kind == "int8":
        if tuple(data.shape) != tuple(shape):
            raise ValueError(f"int8 data has shape {tuple(data.shape)}, expected {tuple(shape)}")
        return int8.dequantize(data, scale, blocksize, dtype)
    raise ValueError(f"quantisation format must be one of {FORMATS}, got {kind!r}")


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio 10·log10(‖w‖² / ‖w − ŵ‖²) in dB (float64; inf when exact)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return float("inf") if noise == 0 else 10.0 * torch.log10(torch.tensor(signal / noise)).item()


__all__ = ["FORMATS", "QuantFormat", "dequantize", "int8", "nf4", "sqnr_db"]
