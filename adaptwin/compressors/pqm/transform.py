"""PQM (arXiv 2309.09136) as a compressor: every targeted ``nn.Linear`` becomes an NF4 base + LoRA.

Targets are the sites the architecture adapter names: the attention projections (q, k, v, o of self- and
cross-attention) and the FFN matrices. Everything else stays dense, as in the paper and in QLoRA:
embeddings (tied to Whisper's output projection, so quantising them would also quantise the logits),
the convolutional stem, positional tables and norms — together a few percent of a Whisper's weights.
The option ``quantize_embeddings`` packs the token embedding too (and the head tied to it, sharing the
table), for the smallest file; see `adaptwin.compressors.quantized.embedding`.

Select it with ``CompressionConfig(attention_method="pqm", ffn_method="pqm", attention_rank=r,
ffn_rank=r)``, where the "rank" is the LoRA rank (1-4; PQM has no low-rank truncation), or with
`quantize`. Each projection is replaced on its own (the model's attention code keeps running), so
attention projections must be separate ``nn.Linear`` modules (Whisper, BERT, Llama; not GPT-2's fused
``c_attn``). The spec of each replaced module::

    {"in_features": 384, "out_features": 384, "bias": true, "rank": 4, "scaling": 1.0,
     "format": {"kind": "nf4", "blocksize": 64, "double_quant": false}, "params": 150000}

``params`` is the logical count (out·in + bias + r·(in + out)) that `adaptwin inspect` divides the
stored bytes by for bits per parameter.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from adaptwin.architectures.base import AttentionSite, Linear, LinearSite
from adaptwin.compressors.base import Compressor
from adaptwin.compressors.pqm.config import LORA_RANKS, PQMConfig, check_lora_rank
from adaptwin.compressors.pqm.layer import NF4LoRALinear
from adaptwin.quant import QuantFormat

_PROJECTIONS = ("q", "k", "v", "o")


def _matrices(site: Any) -> dict[str, Linear]:
    if isinstance(site, AttentionSite):
        return {p: getattr(site, p) for p in _PROJECTIONS}
    return {site.role or "linear": site.linear}


def _params(lin: Linear, rank: int) -> int:
    out_f, in_f = lin.weight.shape
    return out_f * in_f + rank * (in_f + out_f) + (out_f if lin.bias is not None else 0)


def module_paths(model: nn.Module, site: Any) -> dict[str, tuple[str, nn.Linear]]:
    """``{projection: (path, nn.Linear module)}`` of a site's matrices, found by weight identity."""
    if isinstance(site, LinearSite):
        module = model.get_submodule(site.path)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{site.path}: pqm replaces nn.Linear modules, this is a {type(module).__name__}")
        return {site.role or "linear": (site.path, module)}
    found: dict[str, tuple[str, nn.Linear]] = {}
    for root in [site.path] + ([site.out_path] if site.out_path else []):
        for name, m in model.get_submodule(root).named_modules():
            if isinstance(m, nn.Linear):
                for proj in _PROJECTIONS:
                    if proj not in found and m.weight is getattr(site, proj).weight:
                        found[proj] = (f"{root}.{name}" if name else root, m)
    missing = [p for p in _PROJECTIONS if p not in found]
    if missing:
        raise ValueError(f"{site.path}: pqm replaces q/k/v/o as separate nn.Linear modules, but {missing} are not "
                         "(fused or custom projections, e.g. GPT-2's c_attn); compress only the FFN with pqm "
                         "(attention_rank=None)")
    return found


class PQMCompressor(Compressor):
    """NF4 base + LoRA per linear (see the module docstring); options in `PQMConfig`."""

    name = "pqm"
    reduces_parameters = False  # the NF4 base keeps every weight; LoRA adds a few
    site_kind = ("attention", "ffn")  # type: ignore[assignment]  # one method for both kinds of site

    def options(self, config: Any) -> PQMConfig:
        return PQMConfig.of(config, self.name)

    def full_rank(self, site: Any) -> int:
        return LORA_RANKS[-1]

    def check(self, site: Any, rank: int, lora_rank: int, config: Any) -> None:
        self.options(config)
        if getattr(config, "ratio", None) is not None:
            raise ValueError(f"the pqm compressor keeps every weight (NF4) and adds LoRA, so there is no ratio to "
                             f"plan (got ratio={config.ratio}); give the LoRA rank as attention_rank/ffn_rank (1-4)")
        if getattr(config, "quantization", None) is not None:
            raise ValueError(f"the pqm compressor quantises its base to NF4 itself, so it takes quantization=None (got "
                             f"{config.quantization!r}); its format is set as method_options={{'pqm': {{'blocksize': "
                             "64, 'double_quant': True}}")
        if lora_rank:
            raise ValueError(f"{site.path}: for pqm, attention_rank/ffn_rank is the LoRA rank; leave "
                             f"attention_lora_rank/ffn_lora_rank unset (got {lora_rank})")
        check_lora_rank(rank, f"{site.path}: pqm LoRA rank (attention_rank/ffn_rank)")

    def embedding_format(self, config: Any) -> QuantFormat | None:
        """The format `adaptwin.compress` packs the token embedding in (None: the option is off)."""
        opts = self.options(config)
        return opts.quant_format() if opts.quantize_embeddings else None

    def param_count(self, site: Any, rank: int, lora_rank: int, config: Any) -> int:
        return sum(_params(lin, rank) for lin in _matrices(site).values())

    def compress(self, site, rank, lora_rank, config, adapter, stats=None):
        raise ValueError("pqm replaces the projections inside a site, which needs the model: use "
                         "adaptwin.compress(model, CompressionConfig(..., attention_method/ffn_method='pqm')) "
                         "or adaptwin.compressors.pqm.quantize(model), which call compress_group")

    def compress_group(self, model: nn.Module, members: list[tuple[Any, int, int]], config: Any, adapter: Any,
                       stats: dict[str, Any] | None = None) -> dict[str, dict[str, tuple[nn.Module, dict]]]:
        """``{site path: {linear path: (NF4LoRALinear, spec)}}`` for every member ``(site, rank, lora_rank)``.

        Calibration statistics are ignored: NF4 rounds each weight to its nearest code, data-free.
        """
        opts = self.options(config)
        fmt = opts.quant_format()
        out: dict[str, dict[str, tuple[nn.Module, dict]]] = {}
        for site, rank, lora in members:
            self.check(site, rank, lora, config)
            mine = out.setdefault(site.path, {})
            for path, linear in module_paths(model, site).values():
                gen = torch.Generator().manual_seed((config.seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63))
                module = NF4LoRALinear.from_linear(linear, rank, opts.scaling(rank), fmt, gen)
                spec = {"in_features": linear.in_features, "out_features": linear.out_features,
                        "bias": linear.bias is not None, "rank": rank, "scaling": module.scaling,
                        "dtype": str(linear.weight.dtype).removeprefix("torch."), "format": fmt.to_dict(),
                        "params": module.storage()[0]}
                mine[path] = (module, spec)
        return out

    def build(self, spec: dict[str, Any]) -> nn.Module:
        try:
            fmt = QuantFormat(**spec["format"])
            dtype = getattr(torch, spec.get("dtype", "float32"))
            with torch.device("meta"):
                return NF4LoRALinear(int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"]),
                                     int(spec["rank"]), float(spec["scaling"]), fmt, dtype=dtype)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"pqm spec is malformed (bad or missing field {e}); expected in_features, "
                             "out_features, bias, rank, scaling, dtype, format") from None

    def lora_mask(self, module: nn.Module, spec: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        # Only the LoRA factors are Parameters (the base is packed buffers): all of them are LoRA.
        return {name: torch.ones_like(p, dtype=torch.bool) for name, p in module.named_parameters()}

    def describe(self, spec: dict[str, Any]) -> str:
        f = spec.get("format", {})
        return (f"{f.get('kind', 'nf4')} block {f.get('blocksize')}{' dq' if f.get('double_quant') else ''} "
                f"+ LoRA r={spec.get('rank')}")
