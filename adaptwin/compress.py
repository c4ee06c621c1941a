"""`compress(model, config)`: find sites with the model's adapter, plan ranks, replace modules.

The result carries a `CompressionRecord` (``model.adaptwin_record``) with everything `save` needs to
rebuild it later without the original weights, and the per-module parameter accounting that
`adaptwin inspect` prints.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from adaptwin.config import CompressionConfig, PlanItem, plan_ranks
from adaptwin.registry import get_architecture, get_compressor

RECORD_ATTR = "adaptwin_record"


@dataclass
class CompressionRecord:
    """What was replaced, how, and the parameter accounting (JSON-able through `to_dict`)."""

    architecture: str
    config: dict[str, Any]
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {compressor, spec}
    sites: list[dict[str, Any]] = field(default_factory=list)  # one row per compressed site
    finetune: dict[str, Any] | None = None  # FinetuneConfig and per-layer results, when fine-tuned
    adaptations: list[dict[str, Any]] = field(default_factory=list)  # PQM `adapt` runs since, oldest first

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "config": self.config, "modules": self.modules,
                "sites": self.sites, "finetune": self.finetune, "adaptations": self.adaptations}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionRecord:
        try:
            adaptations = d.get("adaptations") or []  # (saves before 2026-11-26 have none)
            if not isinstance(adaptations, list) or not all(isinstance(a, dict) for a in adaptations):
                raise TypeError("'adaptations' must be a list of objects")
            return cls(d["architecture"], d["config"], dict(d["modules"]), list(d["sites"]), d.get("finetune"),
                       list(adaptations))
        except (KeyError, TypeError) as e:
            raise ValueError(f"compression record is malformed: missing or bad field {e}") from None

    def summary(self) -> dict[str, Any]:
        """Totals per component and overall: targeted parameters before/after and the fraction removed."""
        per: dict[str, dict[str, int]] = {}
        for row in self.sites:
            c = per.setdefault(row["component"], {"params_before": 0, "params_after": 0})
            c["params_before"] += row["params_before"]
            c["params_after"] += row["params_after"]
        out = {}
        for name, c in {**per, "total": {k: sum(p[k] for p in per.values())
                                         for k in ("params_before", "params_after")}}.items():
            before = c["params_before"]
            out[name] = {**c, "compression": (1 - c["params_after"] / before) if before else 0.0}
        return out


def _submodule_setter(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


@dataclass
class Plan:
    """The ranks `compress` would use, with the predicted accounting, computed without changing anything."""

    architecture: str
    rows: list[dict[str, Any]]  # as CompressionRecord.sites, for every site the plan compresses
    skipped: list[str]  # sites left uncompressed (rank None)

    def summary(self) -> dict[str, Any]:
        return CompressionRecord(self.architecture, {}, sites=self.rows).summary()


def _prepare(model: nn.Module, config: CompressionConfig):
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be an adaptwin.CompressionConfig, got {type(config).__name__}")
    from adaptwin.architectures import model_type_of

    model_type = model_type_of(model)
    adapter = get_architecture(model_type)
    if getattr(model, RECORD_ATTR, None) is not None:
        raise ValueError("this model is already compressed by adaptwin; compress the original instead")
    components = config.components or adapter.components
    unknown = [c for c in components if c not in adapter.components]
    if unknown:
        raise ValueError(f"unknown components {unknown} for {model_type}; allowed: {list(adapter.components)}")
    from adaptwin.registry import list_compressors

    unknown = sorted(set(config.method_options) - set(list_compressors()))
    if unknown:
        raise ValueError(f"method_options names unknown compressors {unknown}; registered: {list_compressors()}")
    for name, options in config.method_options.items():  # a misspelt option is refused, never ignored
        comp = get_compressor(name)
        if hasattr(comp, "options"):
            comp.options(config)  # raises naming the allowed options
        elif options:
            raise ValueError(f"method_options[{name!r}]: the {name} compressor takes no options, got "
                             f"{sorted(options)}")
    methods = {"attention": get_compressor(config.attention_method), "ffn": get_compressor(config.ffn_method)}
    for kind, comp in methods.items():
        kinds = comp.site_kind if isinstance(comp.site_kind, tuple) else (comp.site_kind,)  # a tuple: several
        if kind not in kinds:
            raise ValueError(f"compressor {comp.name!r} compresses {'/'.join(kinds)} sites, not {kind} sites")
    return model_type, adapter, components, methods


def _sites(adapter: Any, model: nn.Module, components: tuple[str, ...]) -> list[tuple[str, Any]]:
    sites = [("attention", s) for s in adapter.attention_sites(model) if s.component in components]
    return sites + [("ffn", s) for s in adapter.ffn_sites(model) if s.component in components]


def plan(model: nn.Module, config: CompressionConfig) -> Plan:
    """Plan ranks for ``model`` (works on a meta-device model: no weights are read) and check them.

    Raises ``ValueError`` for anything `compress` would refuse, before any work is done.
    """
    return _plan(model, config)[0]


def _whole(comp: Any, method: str, value: Any, path: str) -> int:
    """``value`` if it is a whole number >= 0, else a ValueError naming the compressor's method that gave it (a
    custom compressor's stub returning None failed with a TypeError deep in planning)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"compressor {getattr(comp, 'name', comp)!r}: {method}() returned {value!r} for {path}; "
                         "it must return a whole number >= 0 (see adaptwin.compressors.Compressor)")
    return int(value)


def _plan(model: nn.Module, config: CompressionConfig):
    model_type, adapter, components, methods = _prepare(model, config)
    sites = _sites(adapter, model, components)
    if not sites:
        raise ValueError(f"no compressible modules found in components {list(components)} of {model_type}")
    items = [
        PlanItem(s.path, s.component, kind, _whole(methods[kind], "full_rank", methods[kind].full_rank(s), s.path),
                 s.params(), (lambda r, lora, s=s, c=methods[kind]: _whole(c, "param_count",
                                                                          c.param_count(s, r, lora, config), s.path)))
        for kind, s in sites
    ]
    ranks = plan_ranks(config, items)
    rows, skipped = [], []
    for (kind, site), item in zip(sites, items):
        if ranks.get(item.name) is None:
            skipped.append(item.name)
            continue
        rank, lora = ranks[item.name]
        methods[kind].check(site, rank, lora, config)  # refuse bad ranks before copying anything
        rows.append({
            "path": item.name, "component": item.component, "kind": kind, "compressor": methods[kind].name,
            "rank": rank, "lora_rank": lora, "full_rank": item.full_rank,
            "params_before": item.params_before, "params_after": item.params_at(rank, lora),
        })
    if not rows:
        raise ValueError("the plan leaves every module uncompressed (all ranks None); nothing to do")
    reducing = [r for r in rows if get_compressor(r["compressor"]).reduces_parameters]
    before, after = sum(r["params_before"] for r in reducing), sum(r["params_after"] for r in reducing)
    if after > before:
        warnings.warn(f"these ranks add parameters instead of removing them ({before:,} -> {after:,} at the "
                      f"{len(reducing)} compressed sites): lower the ranks or raise ratio", stacklevel=3)
    return Plan(model_type, rows, skipped), adapter, components, methods


def layer_checksums(model: nn.Module, adapter: Any) -> dict[str, list[float]]:
    """Per layer of the stack: [values, sum, sum of squares] of its weights in float64. `select_layers` copies
    reverted layers from the original it is given; these tell it whether that is the model compressed."""
    import torch

    out = {}
    with torch.no_grad():
        for path, _ in adapter.layer_paths(model):
            values = total = squares = 0.0
            for t in model.get_submodule(path).state_dict().values():
                if t.is_floating_point() and t.numel() and t.device.type != "meta":
                    v = t.detach().double()
                    values, total, squares = values + t.numel(), total + float(v.sum()), squares + float((v * v).sum())
            out[path] = [values, total, squares]
    return out


# The fine-tuning ablations that change how the factors start (paper, Table 3), as (r, l) -> (r', l').
_MODE_RANKS = {
    "all": lambda r, lora: (r, lora),
    "lora_only": lambda r, lora: (r, lora),
    "spectral": lambda r, lora: (r + lora, 0),  # rank r+l SVD, no LoRA
    "lora_scratch": lambda r, lora: (0, r + lora),  # rank r+l LoRA from scratch, no SVD
}


def compress(model: nn.Module, config: CompressionConfig, *, calibration: Iterable[Any] | None = None,
             finetune: Any = None, inplace: bool = False,
             progress: Callable[[str, int, int, float], None] | None = None) -> nn.Module:
    """Compress a supported model; the original is left untouched unless ``inplace=True``.

    Args:
        model: a Hugging Face model (or any model whose ``config.model_type`` has a registered adapter).
        config: what to compress and how much; see `CompressionConfig`.
        calibration: batches of model inputs (dicts passed as ``model(**batch)``); when given, every
            compressed layer is then fine-tuned alone to reproduce the original layer (Eq. 9).
        finetune: an `adaptwin.FinetuneConfig` (epochs, mode, init, run_dir...); defaults apply when
            ``calibration`` is given without it. ``init="whiten"`` and the ``spectral``/``lora_scratch``
            modes also change how the factors are initialised.
        inplace: replace modules in ``model`` itself instead of a deep copy (saves one copy of memory;
            not allowed with calibration, which needs the original as the target).
        progress: called as ``progress(layer, epoch, epochs, loss)`` after every fine-tuning epoch
            (progress bars; only used with ``calibration``).

    Returns:
        The compressed model, in eval mode, with ``model.adaptwin_record`` describing the compression
        (and ``model.adaptwin_finetune``, the per-layer report, when fine-tuned).
    """
    from adaptwin.finetune import FinetuneConfig, collect_stats, run_finetune

    if finetune is not None and calibration is None:
        raise ValueError("finetune=... needs calibration=... (the batches to fine-tune on)")
    if calibration is not None:
        if inplace:
            raise ValueError("inplace=True cannot be combined with calibration: the original is the target")
        finetune = finetune or FinetuneConfig()
        if not isinstance(finetune, FinetuneConfig):
            raise TypeError(f"finetune must be an adaptwin.FinetuneConfig, got {type(finetune).__name__}")
        calibration = list(calibration)
    planned, adapter, components, methods = _plan(model, config)
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} has parameters on the meta device: compress needs its weights "
                         "(load them first; adaptwin.plan(model, config) plans the ranks without them)")
    embedding_fmt = _embedding_format(config, methods)
    if embedding_fmt is not None:  # fail before any work, not after fine-tuning
        from adaptwin.compressors.quantized import input_embedding

        input_embedding(model)
    model_type = planned.architecture
    stats: dict[str, Any] = {}
    if finetune is not None and finetune.init == "whiten":
        sites = [s for _, s in _sites(adapter, model, components)]
        stats = collect_stats(model, [s for s in sites if s.path in {r["path"] for r in planned.rows}],
                              calibration)
    mode = finetune.mode if finetune is not None else "all"
    for row in planned.rows:  # the spectral ablation folds LoRA into the SVD: it must still fit the full rank
        rank = _MODE_RANKS[mode](row["rank"], row["lora_rank"])[0]
        if rank > row["full_rank"]:
            raise ValueError(f"{row['path']}: mode {mode!r} makes rank {row['rank']} + LoRA {row['lora_rank']} "
                             f"an SVD of rank {rank}, above the full rank {row['full_rank']}; "
                             "lower the ranks or pick another mode")
    small = model if inplace else copy.deepcopy(model)
    by_path = {s.path: (kind, s) for kind, s in _sites(adapter, small, components)}
    record = CompressionRecord(model_type, config.to_dict())
    for row in planned.rows:
        row["rank"], row["lora_rank"] = _MODE_RANKS[mode](row["rank"], row["lora_rank"])
    joint = _compress_joint(small, planned.rows, by_path, methods, config, adapter, stats)
    built = []
    for row in planned.rows:
        kind, site = by_path[row["path"]]
        comp = methods[kind]
        extra = {"stats": stats[site.path]} if site.path in stats else {}
        built.append((row, comp, joint[site.path] if site.path in joint
                      else comp.compress(site, row["rank"], row["lora_rank"], config, adapter, **extra)))
    for row, comp, replacements in built:  # swapped in once all are built: an error above leaves the model whole
        for path, (module, spec) in replacements.items():
            _submodule_setter(small, path, module)
            record.modules[path] = {"compressor": comp.name, "spec": spec}
        record.sites.append({**row, "modules": sorted(replacements)})
    fmt = config.quant_format()
    if fmt is not None:  # factors become fake-quantised (trained so, Eq. 10), then packed below
        from adaptwin.compressors.quantized import pack_modules, quantize_modules

        quantize_modules(small, record.modules, fmt, config.quantize_lora)
    setattr(small, RECORD_ATTR, record)
    small.eval()
    if calibration is not None:  # (records itself in record.finetune and small.adaptwin_finetune)
        run_finetune(model, small, calibration, finetune, progress=progress)
    if fmt is not None:
        pack_modules(small, record.modules)
    if embedding_fmt is not None:  # after fine-tuning: the table is frozen, layers are trained on the original's
        from adaptwin.compressors.quantized import quantize_embeddings

        quantize_embeddings(small, record.modules, embedding_fmt)
    return small


def _embedding_format(config: CompressionConfig, methods: dict[str, Any]) -> Any:
    """The format the token embedding is packed in: the factors' with ``quantize_embeddings``, else one a
    compressor asks for through an ``embedding_format(config)`` method (pqm's option), else None."""
    if config.quantize_embeddings:
        return config.quant_format()
    for comp in {id(c): c for c in methods.values()}.values():
        fmt = comp.embedding_format(config) if hasattr(comp, "embedding_format") else None
        if fmt is not None:
            return fmt
    return None


def _compress_joint(model: nn.Module, rows: list[dict[str, Any]], by_path: dict[str, tuple[str, Any]],
                    methods: dict[str, Any], config: CompressionConfig, adapter: Any,
                    stats: dict[str, Any]) -> dict[str, dict[str, tuple[nn.Module, dict[str, Any]]]]:
    """Replacements from compressors that factor many sites together (``compress_group``; e.g. residual's
    weights shared across layers): ``{site path: {module path: (module, spec)}}``. ``model`` is only read."""
    out: dict[str, dict[str, tuple[nn.Module, dict[str, Any]]]] = {}
    for comp in {id(c): c for c in methods.values()}.values():
        if not hasattr(comp, "compress_group"):
            continue
        members = [(by_path[r["path"]][1], r["rank"], r["lora_rank"]) for r in rows if methods[r["kind"]] is comp]
        if members:
            mine = {s.path: stats[s.path] for s, _, _ in members if s.path in stats}
            out.update(comp.compress_group(model, members, config, adapter, stats=mine))
    return out


def compression_record(model: nn.Module) -> CompressionRecord:
    record = getattr(model, RECORD_ATTR, None)
    if record is None:
        raise ValueError("this model was not compressed by adaptwin (no adaptwin_record); call adaptwin.compress")
    return record
