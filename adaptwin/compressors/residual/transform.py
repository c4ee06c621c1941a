"""ResidualTransformer (arXiv 2310.02489) as a post-training compressor.

Each matrix type (per component: q, k, v, o of self- and cross-attention, each FFN matrix) is shared by
groups of K adjacent layers: W_i ≈ S + A_i·B_iᵀ + diag(d_i), S one Parameter for the group. The paper
trains this structure from scratch; here it is fitted to a trained model's weights (`residual_factors`),
then, with calibration data, every group is fine-tuned jointly on its layers' captured calls
(`adaptwin.finetune`: layers that share a parameter are trained together).

Attention projections are replaced one by one (the model's own attention code keeps running), so the
attention site must keep q, k, v and o as separate ``nn.Linear`` modules (BERT, Whisper, Llama; not
GPT-2's fused ``c_attn``). Accounting: the first layer of a group carries S, every layer its own factors,
diagonal and bias, so the per-site counts add up to the stored parameters exactly.

What combines: residual attention and/or FFN with any other method on the other kind (e.g. residual FFN +
product-twin attention), LoRA ranks, every fine-tuning mode except ``sequential``, and
``FinetuneConfig(init="whiten")``: with calibration statistics each group is fitted to minimise the error of
its matrices' outputs on their own layers' inputs (q on the query input, k/v on the key/value input, o on
the attention-mixed values, each FFN matrix on its input; centred where a bias takes the mean, which the
bias then absorbs: b_i' = b_i + (W_i − Ŵ_i)·μ_i). Refused with an error: quantisation (the packed formats
take factors, not a shared dense matrix), ``ratio`` planning (give ranks), and groups whose layers are not
all compressed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptwin.architectures.base import AttentionSite, Linear, LinearSite
from adaptwin.compressors.base import Compressor
from adaptwin.compressors.factorize import centred_gram, lora_init
from adaptwin.compressors.residual.config import ResidualConfig
from adaptwin.compressors.residual.init import residual_factors
from adaptwin.compressors.residual.layer import ResidualLinear

_PROJECTIONS = ("q", "k", "v", "o")
_STATS_KEY = {"q": "x", "k": "kv", "v": "kv", "o": "o"}  # which `collect_stats` Gram weights each projection


def _matrices(site: Any) -> dict[str, Linear]:
    if isinstance(site, AttentionSite):
        return {p: getattr(site, p) for p in _PROJECTIONS}
    return {site.role or "linear": site.linear}


def _kind(site: Any) -> str:
    return "attention" if isinstance(site, AttentionSite) else "ffn"


class ResidualCompressor(Compressor):
    name = "residual"
    site_kind = ("attention", "ffn")  # type: ignore[assignment]  # one method for both kinds of site

    def options(self, config: Any) -> ResidualConfig:
        return ResidualConfig.of(config, self.name)

    def full_rank(self, site: Any) -> int:
        return min(min(lin.weight.shape) for lin in _matrices(site).values())

    def check(self, site: Any, rank: int, lora_rank: int, config: Any) -> None:
        self.options(config)  # validates the options before any work
        if getattr(config, "ratio", None) is not None:
            raise ValueError("the residual compressor needs explicit ranks (attention_rank=..., ffn_rank=...), not "
                             f"ratio={config.ratio}: a group's shared matrix is a fixed cost (1/K of the layers' "
                             "size) that the ratio planner, which scales every rank by one factor, cannot plan around")
        if getattr(config, "quantization", None) is not None:
            raise ValueError(f"{site.path}: the residual compressor does not combine with quantization="
                             f"{config.quantization!r} (the packed formats store factors, not a shared dense "
                             "matrix); it takes quantization=None; quantise with the 'product_twin'/'svd' methods")
        for proj, lin in _matrices(site).items():
            full = min(lin.weight.shape)
            if rank > full:
                raise ValueError(f"{site.path}: rank {rank} exceeds the full rank {full} of {proj} "
                                 f"{tuple(lin.weight.shape)}; allowed: 1..{full}")

    def param_count(self, site: Any, rank: int, lora_rank: int, config: Any) -> int:
        opts = self.options(config)
        owner = site.layer % opts.size(site.component, _kind(site)) == 0  # the group's first layer carries S
        total = 0
        for lin in _matrices(site).values():
            out_f, in_f = lin.weight.shape
            total += (rank + lora_rank) * (in_f + out_f) + (min(out_f, in_f) if opts.diagonal else 0)
            total += out_f if lin.bias is not None else 0
            total += out_f * in_f if owner else 0
        return total

    def compress(self, site, rank, lora_rank, config, adapter, stats=None):
        raise ValueError("the residual compressor shares weights across layers, so it compresses a whole "
                         "component at once: use adaptwin.compress(model, CompressionConfig(..., "
                         "attention_method/ffn_method='residual')), which calls compress_group")

    def compress_group(self, model: nn.Module, members: list[tuple[Any, int, int]], config: Any, adapter: Any,
                       stats: dict[str, Any] | None = None) -> dict[str, dict[str, tuple[nn.Module, dict]]]:
        """Replacements for every member site ``(site, rank, lora_rank)``: ``{site path: {module path: (module,
        spec)}}``, modules of one group holding one shared Parameter. ``model`` is only read."""
        opts = self.options(config)
        stats = stats or {}
        for site, rank, lora in members:
            self.check(site, rank, lora, config)
        # Every layer index of each (component, kind) in the model: a group must be complete.
        every: dict[tuple[str, str], set[int]] = {}
        for kind, sites in (("attention", adapter.attention_sites(model)), ("ffn", adapter.ffn_sites(model))):
            for s in sites:
                every.setdefault((s.component, kind), set()).add(s.layer)
        groups: dict[tuple, list[tuple[Any, str, str, Linear, int, int]]] = {}
        for site, rank, lora in members:
            kind = _kind(site)
            k = opts.size(site.component, kind)
            slot = ("cross" if site.cross else "self") if kind == "attention" else site.role
            for proj, (mpath, lin) in _module_paths(model, site).items():
                key = (site.component, kind, slot, proj, site.layer // k)
                groups.setdefault(key, []).append((site, proj, mpath, lin, rank, lora))
        out: dict[str, dict[str, tuple[nn.Module, dict]]] = {}
        for (component, kind, _slot, _proj, g), rows in groups.items():
            k = opts.size(component, kind)
            rows.sort(key=lambda r: r[0].layer)
            expected = sorted(i for i in every[(component, kind)] if i // k == g)
            got = [r[0].layer for r in rows]
            if got != expected:
                raise ValueError(f"residual: {component} {kind} layers {expected} form one group (K={k}) but only "
                                 f"{got} are compressed; compress every layer of a group (check overrides) or "
                                 "change group_size")
            self._group(rows, opts, config, out, [stats.get(r[0].path) for r in rows])
        return out

    def _group(self, rows: list, opts: ResidualConfig, config: Any, out: dict, stats: list) -> None:
        lins = [r[3] for r in rows]
        weights = [lin.weight for lin in lins]
        ranks = [r[4] for r in rows]
        keys = [_STATS_KEY[r[1]] if isinstance(r[0], AttentionSite) else "x" for r in rows]  # FFN: its own input
        grams = means = None
        if all(st is not None and key in st for st, key in zip(stats, keys)):  # FinetuneConfig(init="whiten")
            moments = [st[key].to(weights[0].device, torch.float64) for st, key in zip(stats, keys)]
            if lins[0].bias is not None:  # the bias takes the mean's share: weight by the centred moment
                grams, means = map(list, zip(*(centred_gram(g) for g in moments)))
            else:  # nothing absorbs the mean: the uncentred moment, per token as the centred one
                grams = [g[:-1, :-1] / g[-1, -1].clamp_min(1.0) for g in moments]
        fac = residual_factors(weights, ranks, diagonal=opts.diagonal, method=opts.init,
                               iterations=opts.iterations, tol=opts.tol, grams=grams)
        ref = weights[0]
        shared = nn.Parameter(fac.shared.to(ref.device, ref.dtype))
        paths = [r[2] for r in rows]
        for j, ((site, _, mpath, lin, rank, lora), left, right) in enumerate(zip(rows, fac.lefts, fac.rights)):
            out_f, in_f = lin.weight.shape
            bias = lin.bias
            if means is not None:  # b' = b + (W − Ŵ)·μ: the output error along the mean input goes to the bias
                approx = fac.shared + left @ right.T
                if fac.diags is not None:
                    approx[:len(fac.diags[j]), :len(fac.diags[j])] += torch.diag(fac.diags[j])
                bias = lin.bias.double() + (lin.weight.double() - approx) @ means[j]
            if lora:
                right = torch.cat([right, lora_init(right, lora, config.seed, mpath)], 1)
                left = torch.cat([left, left.new_zeros(out_f, lora)], 1)
            spec = {"in_features": in_f, "out_features": out_f, "rank": rank, "lora_rank": lora,
                    "diagonal": opts.diagonal, "bias": lin.bias is not None, "group": paths, "index": j,
                    "init": opts.init, "init_error": {"mean": fac.error_mean, opts.init: fac.error},
                    "init_error_of": "outputs" if fac.whitened else "weights", "sweeps": fac.sweeps}
            module = ResidualLinear(in_f, out_f, rank, lora, opts.diagonal, lin.bias is not None, shared=shared)
            with torch.no_grad():
                for name, value in (("in_factor", right.T), ("out_factor", left),
                                    ("diag", fac.diags[j] if fac.diags is not None else None), ("bias", bias)):
                    if value is not None:
                        value = value.detach().to(ref.device, ref.dtype)  # contiguous, as a loaded save is
                        setattr(module, name, nn.Parameter(value.clone(memory_format=torch.contiguous_format)))
            out.setdefault(site.path, {})[mpath] = (module, spec)

    def build(self, spec: dict[str, Any]) -> nn.Module:
        keys = ("in_features", "out_features", "rank", "lora_rank", "diagonal", "bias")
        missing = [k for k in keys if k not in spec]
        if missing:
            raise ValueError(f"residual spec lacks {missing}")
        with torch.device("meta"):
            return ResidualLinear(**{k: spec[k] for k in keys})

    def lora_mask(self, module: nn.Module, spec: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        lora = torch.arange(spec["rank"] + spec["lora_rank"]) >= spec["rank"]  # last lora_rank directions
        masks: dict[str, torch.Tensor | None] = {name: None for name, _ in module.named_parameters()}
        masks["in_factor"] = lora[:, None].expand_as(module.in_factor)
        masks["out_factor"] = lora[None, :].expand_as(module.out_factor)
        for name in ("shared", "diag", "bias"):
            if name in masks:
                masks[name] = torch.zeros_like(getattr(module, name), dtype=torch.bool)
        return masks

    def describe(self, spec: dict[str, Any]) -> str:
        group = spec.get("group") or []
        share = (f"shares S with {len(group) - 1} layer(s), {'stores' if spec.get('index') == 0 else 'uses'} it"
                 if len(group) > 1 else "own S (K=1)")
        return f"r={spec['rank']}+{spec['lora_rank']}, {'diag, ' if spec.get('diagonal') else ''}{share}"


def _module_paths(model: nn.Module, site: Any) -> dict[str, tuple[str, Linear]]:
    """``{projection: (path of its nn.Linear module, weights)}`` for a site's matrices."""
    if isinstance(site, LinearSite):
        return {site.role or "linear": (site.path, site.linear)}
    found: dict[str, tuple[str, Linear]] = {}
    roots = [site.path] + ([site.out_path] if site.out_path else [])
    for root in roots:
        for name, m in model.get_submodule(root).named_modules():
            if not isinstance(m, nn.Linear):
                continue
            for proj in _PROJECTIONS:
                if proj not in found and m.weight is getattr(site, proj).weight:
                    found[proj] = (f"{root}.{name}" if name else root, getattr(site, proj))
    missing = [p for p in _PROJECTIONS if p not in found]
    if missing:
        raise ValueError(f"{site.path}: the residual compressor replaces q/k/v/o as separate nn.Linear modules, "
                         f"but {missing} are not (fused or custom projections, e.g. GPT-2's c_attn); use "
                         "attention_method='product_twin' for this model and residual for its FFN")
    return found
