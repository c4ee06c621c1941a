"""Packed token embeddings (NF4 / int8) and the output head tied to them.

The input token embedding is most of a small model's file: all-MiniLM-L6-v2's 30522x384 word table is
11.7 M of its 22.7 M parameters, so no quantisation of the attention and FFN factors alone brings its file
below ~0.55x of fp32. `quantize_embeddings` packs that table (``CompressionConfig(quantize_embeddings=True)``,
or the pqm compressor's ``quantize_embeddings`` option) in the same formats and layouts as the factors
(`adaptwin.quant`): a lookup gathers the requested rows' codes and scales and decodes them in one
vectorised pass (`QuantFormat.dequantize_rows`); the dense table is never formed.

Which tables: the model's input token embedding (``get_input_embeddings()``), under every path that holds
it. Position and token-type tables stay in the model's dtype: they are small (MiniLM: 512x384 + 2x384,
0.9 % of its weights) and Whisper's sinusoidal encoder positions are not trained weights at all.

Tied output heads: a module whose ``weight`` *is* the table (Whisper's ``proj_out``, BERT's MLM
``cls.predictions.decoder``) becomes a `QuantTiedLinear` holding the very same packed tensors, so the
logits use the quantised table and the tie survives (`adaptwin.save` stores the tensors once and
`adaptwin.load` re-ties them). If the table is shared in any other way, nothing is quantised and a warning
names the other user: quantising one side only would silently break the tie.

Record entries (compressor ``"quantized_embedding"``)::

    {"module": "embedding", "num_embeddings": 30522, "embedding_dim": 384, "padding_idx": 0,
     "dtype": "float32", "format": {"kind": "nf4", "blocksize": 64, "double_quant": true}, "params": 11720448}
    {"module": "head", "in_features": 384, "out_features": 51865, "bias": false, "dtype": "float32",
     "format": {...}, "tied_to": "model.decoder.embed_tokens", "params": 0}

A head's ``params`` counts only what it stores itself (its bias): its matrix is counted with the table.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from adaptwin.compressors.base import Compressor
from adaptwin.ops.rank_linear import ABSENT, dequantize_factor, run_rank_linear
from adaptwin.quant import QuantFormat

log = logging.getLogger(__name__)
NAME = "quantized_embedding"


def _stored(module: nn.Module, fmt: QuantFormat, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    return {key: getattr(module, f"weight_{key}") for key in fmt.layout(shape)}


class QuantEmbedding(nn.Module):
    """An `nn.Embedding` whose table (V, d) lives packed as buffers ``weight_<tensor>`` (see `QuantFormat.layout`).

    ``forward(ids)``: ids (...,) integer -> (..., d) in ``dtype``, equal bit for bit to the dequantised
    table's rows. Holds no Parameters (nothing to train). Built empty; fill it with `from_embedding` or by
    loading a state dict.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: QuantFormat, padding_idx: int | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx, self.fmt = (
            num_embeddings, embedding_dim, padding_idx, fmt)
        self.dtype = dtype or torch.get_default_dtype()
        for key, (shape, dt) in fmt.layout(self.shape).items():
            self.register_buffer(f"weight_{key}", torch.empty(shape, dtype=dt))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding, fmt: QuantFormat) -> QuantEmbedding:
        w = embedding.weight.detach()  # (V, d)
        with torch.device("meta"):
            new = cls(embedding.num_embeddings, embedding.embedding_dim, fmt, embedding.padding_idx, w.dtype)
        for key, value in fmt.quantize(w).items():
            setattr(new, f"weight_{key}", value)
        return new

    def stored(self) -> dict[str, torch.Tensor]:
        return _stored(self, self.fmt, self.shape)

    def _apply(self, fn, recurse: bool = True):
        """``model.to(torch.bfloat16)`` (or ``.half()``, ``.float()``) also changes the dtype the rows come out
        in, as it would an `nn.Embedding`'s: otherwise a bf16 model's embeddings stay float32 and the first
        layer norm refuses the mixed dtypes."""
        super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self._whole_rows(input_ids)
        if rows is not None:
            return rows
        return self.fmt.dequantize_rows(self.stored(), self.shape, input_ids, self.dtype)  # (..., d)

    def _whole_rows(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The gathered rows decoded as one small factor (`adaptwin.ops.rank_linear.dequantize_factor`: the CPU
        kernels' decoding where they take the call), where each row is whole bytes and whole scale blocks (NF4,
        d even and a multiple of the blocksize: Whisper's and MiniLM's tables): one gather of code bytes, one
        of scales (their double-quantised form decoded for the gathered blocks only), one decode. On the 2-core
        CPU, 30522 x 384 at blocksize 64: one token 19 us against `QuantFormat.dequantize_rows`' 64 us, 32 x
        128 tokens 0.18 against 11.7 ms (double quantised: 72 against 105 us, 0.76 against 23 ms). The same
        values bit for bit (the same float32 products); None where it does not apply (the caller then takes
        that general path)."""
        fmt, (n_rows, d) = self.fmt, self.shape
        if fmt.kind != "nf4" or d % 2 or d % fmt.blocksize or input_ids.numel() == 0:
            return None
        ids = input_ids.reshape(-1).long()
        # index_select raises IndexError on an id < 0 or >= n_rows, as nn.Embedding does
        codes = self.weight_qweight.view(n_rows, d // 2).index_select(0, ids)  # (n, d/2) bytes
        per_row = d // fmt.blocksize
        if fmt.double_quant:  # the gathered blocks' scales only
            scales = fmt.block_scales(self.stored(), ids[:, None] * per_row + torch.arange(per_row, device=ids.device))
        else:
            scales = self.weight_absmax.view(n_rows, per_row).index_select(0, ids)
        w = dequantize_factor(codes.view(-1), scales.reshape(-1), "nf4", fmt.blocksize, [ids.numel(), d])
        return w.view(*input_ids.shape, d).to(self.dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table (V, d) as ``dtype`` (tests and inspection; forward never forms it)."""
        return self.fmt.dequantize(self.stored(), self.shape, dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, {self.fmt.kind}"
                f"(blocksize={self.fmt.blocksize}, double_quant={self.fmt.double_quant}), dtype={self.dtype}")


class QuantTiedLinear(nn.Module):
    """An output head ``y = x·Wᵀ + b`` whose W (out, in) is a `QuantEmbedding`'s packed table (the same tensors).

    x (..., in) -> (..., out), through `torch.ops.adaptwin.rank_linear` with the table as its only factor.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: QuantFormat,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        for key, (shape, dt) in fmt.layout((out_features, in_features)).items():
            self.register_buffer(f"weight_{key}", torch.empty(shape, dtype=dt))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    @classmethod
    def tied_to(cls, table: QuantEmbedding, head: nn.Linear) -> QuantTiedLinear:
        """``head`` with its weight replaced by ``table``'s packed tensors (shared, not copied); its bias kept."""
        with torch.device("meta"):
            new = cls(head.in_features, head.out_features, False, table.fmt)
        for key, value in table.stored().items():
            setattr(new, f"weight_{key}", value)
        new.bias = head.bias  # the same Parameter (BERT ties it to cls.predictions.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stored = _stored(self, self.fmt, (self.out_features, self.in_features))
        return run_rank_linear(x, stored["qweight"], self.fmt.scale(stored), self.fmt.kind, self.fmt.blocksize,
                               [self.out_features, self.in_features], *ABSENT, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, tied packed "
                f"{self.fmt.kind}(blocksize={self.fmt.blocksize}, double_quant={self.fmt.double_quant})")


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def input_embedding(model: nn.Module) -> nn.Embedding:
    """``model``'s input token table, or ``ValueError`` naming what the model has instead (checked before
    compression starts, so a model without one fails fast)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"quantize_embeddings needs a model whose get_input_embeddings() is an nn.Embedding; "
                         f"{type(model).__name__} gives {type(emb).__name__}")
    return emb


def quantize_embeddings(model: nn.Module, modules: dict[str, dict[str, Any]], fmt: QuantFormat) -> list[str]:
    """Pack ``model``'s input token embedding (and a head tied to it) in ``fmt``; add them to ``modules``.

    Returns the replaced module paths; ``[]`` (with a logged warning) when the table is shared in a way
    that cannot be kept. Raises ``ValueError`` when the model has no ``nn.Embedding`` input embedding.
    """
    emb = input_embedding(model)
    weight = emb.weight
    users = [name.rpartition(".") for name, p in model.named_parameters(remove_duplicate=False) if p is weight]
    tables, heads, other = [], [], []
    for parent, _, leaf in users:
        m = model.get_submodule(parent)
        kind = (tables if isinstance(m, nn.Embedding) and leaf == "weight" else
                heads if type(m) is nn.Linear and leaf == "weight" else other)
        kind.append((parent, m))
    if other:
        log.warning("embedding not quantised: its weight is also %s, which cannot share a packed table "
                    "(quantising one side only would break the tie)", ", ".join(f"{p} ({type(m).__name__})"
                                                                                 for p, m in other))
        return []
    taken = [p for p, _ in tables + heads if p in modules]
    if taken:
        raise ValueError(f"{taken} are already compressed; cannot also quantise them as embeddings")
    table = QuantEmbedding.from_embedding(emb, fmt)
    dtype = str(weight.dtype).removeprefix("torch.")
    spec = {"module": "embedding", "num_embeddings": emb.num_embeddings, "embedding_dim": emb.embedding_dim,
            "padding_idx": emb.padding_idx, "dtype": dtype, "format": fmt.to_dict(), "params": weight.numel()}
    for path, _ in tables:
        _set(model, path, table)
        modules[path] = {"compressor": NAME, "spec": dict(spec)}
    for path, head in heads:
        _set(model, path, QuantTiedLinear.tied_to(table, head))
        modules[path] = {"compressor": NAME, "spec": {
            "module": "head", "in_features": head.in_features, "out_features": head.out_features,
            "bias": head.bias is not None, "dtype": dtype, "format": fmt.to_dict(), "tied_to": tables[0][0],
            "params": head.bias.numel() if head.bias is not None else 0}}
    return [p for p, _ in tables + heads]


class EmbeddingCompressor(Compressor):
    """Rebuilds (and describes) packed embeddings and tied heads; never planned on a site itself.

    Choose it with ``CompressionConfig(quantization=..., quantize_embeddings=True)`` or the pqm option.
    """

    name = NAME
    site_kind = "wrapper"

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("the 'quantized_embedding' compressor packs the token embedding after compression; "
                         "choose it with CompressionConfig(quantization=..., quantize_embeddings=True), not as "
                         "attention_method/ffn_method")

    full_rank = param_count = compress = _refuse

    def build(self, spec: dict[str, Any]) -> nn.Module:
        try:
            fmt = QuantFormat(**spec["format"])
            dtype = getattr(torch, spec.get("dtype", "float32"))
            with torch.device("meta"):
                if spec["module"] == "embedding":
                    return QuantEmbedding(int(spec["num_embeddings"]), int(spec["embedding_dim"]), fmt,
                                          spec.get("padding_idx"), dtype)
                if spec["module"] == "head":
                    return QuantTiedLinear(int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"]),
                                           fmt, dtype)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"quantized_embedding spec is malformed (bad or missing field {e})") from None
        raise ValueError(f"quantized_embedding spec 'module' must be 'embedding' or 'head', got {spec['module']!r}")

    def lora_mask(self, module: nn.Module, spec: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        return {name: None for name, _ in module.named_parameters()}

    def describe(self, spec: dict[str, Any]) -> str:
        f = spec.get("format", {})
        what = "embedding" if spec.get("module") == "embedding" else f"head tied to {spec.get('tied_to')}"
        return f"{what}, {f.get('kind')} block {f.get('blocksize')}{' dq' if f.get('double_quant') else ''}"
