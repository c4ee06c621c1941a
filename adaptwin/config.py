"""`CompressionConfig` and rank planning.

This room knows ranks and parameter counts, never models or kernels: the planner works on abstract
`PlanItem`s (a name, a component, a kind, a full rank and a parameter-count function) that the
compression driver builds from an architecture adapter's sites.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

_OVERRIDE_KEYS = ("attention_rank", "attention_lora_rank", "ffn_rank", "ffn_lora_rank")
_TWINS = ("qk", "vo")


@dataclass
class CompressionConfig:
    """What to compress and how much.

    Either give ``ratio`` (the fraction of the targeted parameters to remove, planned with the paper's
    split) or explicit ranks; not both.

    Args:
        ratio: fraction in (0, 1) of the targeted parameters (attention projections and FFN linears
            of the selected components) to remove. Each component is planned on its own so that each
            loses ``ratio`` of its targeted parameters.
        attention_rank: spectral rank r_a of every product twin (per head). ``None`` leaves attention
            uncompressed (when no ``ratio`` is given).
        attention_lora_rank: LoRA rank l_a concatenated to every twin's factors (per head).
        ffn_rank: spectral rank r_f of every FFN matrix.
        ffn_lora_rank: LoRA rank l_f of every FFN matrix.
        components: which components to compress (``("encoder",)``, ``("decoder",)``...); ``None``
            compresses every component the architecture adapter knows.
        twins: which product twins to form: ``"qk"`` (W_Qᵀ·W_K) and/or ``"vo"`` (W_Vᵀ·W_Oᵀ).
            Rotary models (Llama) allow only ``("vo",)``.
        overrides: ``{name pattern: {key: rank or None}}`` applied after planning; patterns are
            fnmatch globs matched against module paths (e.g. ``"model.encoder.layers.0.*"``); keys are
            ``attention_rank``, ``attention_lora_rank``, ``ffn_rank``, ``ffn_lora_rank``; a ``None``
            rank leaves the matched modules uncompressed. A pattern that matches nothing is an error.
        attention_factor: attention's compression factor relative to the FFN's (paper: 0.7).
        width_multiple: with ``ratio``, round every planned width (rank + LoRA rank: per head for attention)
            to a multiple of this, the FFN widths then searched as usual to land the ratio. GEMMs over
            widths that are multiples of 8 run faster on CPU (MKL: the four FFN GEMMs of a Whisper-tiny
            layer at width 152 took 9.2 ms against 9.8 ms at 153) and tensor cores want multiples of 8-16.
            1 (default): no rounding. A width below the multiple stays as planned (at least 1).
        attention_lora_fraction: l_a / (r_a + l_a) when planning from ``ratio`` (paper 4:1 → 0.2).
        ffn_lora_fraction: l_f / (r_f + l_f) when planning from ``ratio`` (paper 9:1 → 0.1).
        attention_method: registered compressor for attention sites.
        ffn_method: registered compressor for FFN linear sites.
        seed: seed of the LoRA factors' random initialisation (compression is deterministic).
        quantization: store the low-rank factors packed: ``"nf4"`` (4-bit NormalFloat, bitsandbytes'
            layout) or ``"int8"`` (symmetric absmax); ``None`` keeps them in the model's dtype. With
            calibration, fine-tuning trains them with fake quantisation (Eq. 10) before packing.
        quant_blocksize: elements per scale. NF4: an even number, default 64. int8: default ``None``
            is one scale per row (per rank direction); a number gives blocks of that many elements.
        double_quant: NF4 only: quantise the block scales too (8-bit, blocks of 256; QLoRA).
        quantize_lora: quantise the LoRA directions as well; by default they stay in the model's dtype.
        quantize_embeddings: also store the input token embedding packed in the same format (and an output
            head tied to it, sharing the packed table); needs ``quantization``. Position embeddings stay in
            the model's dtype. See `adaptwin.compressors.quantized.embedding`.
        method_options: per-method settings, ``{registered compressor name: {option: value}}``, read and
            validated by that compressor (e.g. ``{"residual": {"group_size": 3}}``; see its config class).
    """

    ratio: float | None = None
    attention_rank: int | None = None
    attention_lora_rank: int | None = None
    ffn_rank: int | None = None
    ffn_lora_rank: int | None = None
    components: tuple[str, ...] | None = None
    twins: tuple[str, ...] = _TWINS
    overrides: dict[str, dict[str, int | None]] = field(default_factory=dict)
    attention_factor: float = 0.7
    width_multiple: int = 1
    attention_lora_fraction: float = 0.2
    ffn_lora_fraction: float = 0.1
    attention_method: str = "product_twin"
    ffn_method: str = "svd"
    seed: int = 0
    quantization: str | None = None
    quant_blocksize: int | None = None
    double_quant: bool = False
    quantize_lora: bool = False
    quantize_embeddings: bool = False
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.components is not None:
            if isinstance(self.components, str):
                self.components = (self.components,)
            self.components = tuple(self.components)
            if not self.components:
                raise ValueError("components must name at least one component, or be None for all")
        if isinstance(self.twins, str):
            self.twins = (self.twins,)
        self.twins = tuple(self.twins)
        bad = [t for t in self.twins if t not in _TWINS]
        if bad or not self.twins or len(set(self.twins)) != len(self.twins):
            raise ValueError(f"twins must be a non-empty subset of {_TWINS} without repeats, got {self.twins}")
        ranks = {k: getattr(self, k) for k in _OVERRIDE_KEYS}
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise ValueError(f"ratio must be a number in (0, 1), got {self.ratio!r}")
            if not 0.0 < float(self.ratio) < 1.0:
                raise ValueError(f"ratio must lie strictly between 0 and 1 (fraction removed), got {self.ratio}")
            self.ratio = float(self.ratio)
            given = ", ".join(f"{k}={v}" for k, v in ranks.items() if v is not None)
            if given:
                raise ValueError(f"give either ratio or explicit ranks, not both (ratio={self.ratio}, {given})")
        elif self.attention_rank is None and self.ffn_rank is None and not self.overrides:
            raise ValueError("nothing to compress: give ratio=..., or attention_rank=... and/or ffn_rank=...")
        for k, v in ranks.items():
            _check_rank(k, v)
        if self.attention_rank is None and self.attention_lora_rank:
            raise ValueError("attention_lora_rank needs attention_rank (LoRA is concatenated to the SVD factors)")
        if self.ffn_rank is None and self.ffn_lora_rank:
            raise ValueError("ffn_lora_rank needs ffn_rank (LoRA is concatenated to the SVD factors)")
        if not isinstance(self.overrides, dict):
            got = type(self.overrides).__name__
            raise ValueError(f"overrides must be a dict {{pattern: {{key: rank}}}}, got {got}")
        for pattern, values in self.overrides.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"override patterns must be non-empty strings, got {pattern!r}")
            if not isinstance(values, dict) or not values:
                raise ValueError(f"override {pattern!r} must map some of {_OVERRIDE_KEYS} to ranks")
            for k, v in values.items():
                if k not in _OVERRIDE_KEYS:
                    raise ValueError(f"override {pattern!r}: unknown key {k!r}; allowed: {_OVERRIDE_KEYS}")
                _check_rank(f"override {pattern!r} {k}", v)
        if isinstance(self.width_multiple, bool) or not isinstance(self.width_multiple, int) \
                or not 1 <= self.width_multiple <= 256:
            raise ValueError(f"width_multiple must be a whole number in 1..256, got {self.width_multiple!r}")
        if self.width_multiple != 1 and self.ratio is None:
            raise ValueError("width_multiple applies to ranks planned from ratio; explicit ranks are used as given")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be a whole number in [0, 2**63), got {self.seed!r}")
        for name in ("attention_factor", "attention_lora_fraction", "ffn_lora_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0.0 < self.attention_factor <= 2.0:
            raise ValueError(f"attention_factor must be in (0, 2], got {self.attention_factor}")
        for name in ("attention_lora_fraction", "ffn_lora_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        self.quant_format()  # validates quantization, quant_blocksize, double_quant
        if not isinstance(self.quantize_lora, bool):
            raise ValueError(f"quantize_lora must be True or False, got {self.quantize_lora!r}")
        if self.quantize_lora and self.quantization is None:
            raise ValueError("quantize_lora=True needs quantization='nf4' or 'int8'")
        if not isinstance(self.quantize_embeddings, bool):
            raise ValueError(f"quantize_embeddings must be True or False, got {self.quantize_embeddings!r}")
        if self.quantize_embeddings and self.quantization is None:
            raise ValueError("quantize_embeddings=True needs quantization='nf4' or 'int8' (the format the embedding "
                             "is stored in; with the pqm compressor use method_options={'pqm': "
                             "{'quantize_embeddings': True}})")
        if not isinstance(self.method_options, dict) or not all(
                isinstance(k, str) and k and isinstance(v, dict) for k, v in self.method_options.items()):
            raise ValueError("method_options must be a dict {compressor name: {option: value}}, "
                             f"got {self.method_options!r}")

    def quant_format(self) -> Any:
        """The `adaptwin.quant.QuantFormat` the factors are stored in, or None when not quantised."""
        from adaptwin.quant import FORMATS, QuantFormat

        if self.quantization is None:
            if self.quant_blocksize is not None or self.double_quant:
                raise ValueError("quant_blocksize and double_quant need quantization='nf4' or 'int8'")
            return None
        if self.quantization not in FORMATS:
            raise ValueError(f"quantization must be one of {FORMATS} or None, got {self.quantization!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be True or False, got {self.double_quant!r}")
        default = 64 if self.quantization == "nf4" else 0
        if self.quantization == "int8" and self.quant_blocksize == 0:
            raise ValueError("int8 quant_blocksize must be a whole number > 0, or None for one scale per row")
        blocksize = default if self.quant_blocksize is None else self.quant_blocksize
        return QuantFormat(self.quantization, blocksize, self.double_quant)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["components"] = list(self.components) if self.components is not None else None
        d["twins"] = list(self.twins)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompressionConfig:
        """Inverse of `to_json`."""
        return cls.from_dict(parse_json(text, cls.__name__))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressionConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a CompressionConfig is stored as a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CompressionConfig fields {unknown}; allowed: {sorted(known)}")
        d = dict(d)
        for key in ("components", "twins"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def parse_json(text: str, what: str) -> Any:
    """``json.loads(text)``, a parse error raised as ValueError naming ``what`` was being read."""
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"a {what} is stored as a JSON object; could not parse it: {e}") from None


def _check_rank(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number or None, got {value!r}")
    floor = 0 if "lora" in name else 1
    if value < floor:
        raise ValueError(f"{name} must be >= {floor}, got {value}")


@dataclass
class PlanItem:
    """One compressible site, as the planner sees it.

    ``params_at(rank, lora_rank)`` is the site's parameter count when compressed at that rank; the
    planner never looks inside.
    """

    name: str
    component: str
    kind: str  # "attention" or "ffn"
    full_rank: int
    params_before: int
    params_at: Callable[[int, int], int]


def _split(width: int, lora_fraction: float) -> tuple[int, int]:
    lora = int(round(width * lora_fraction))
    lora = min(lora, width - 1)  # keep at least one spectral direction
    return width - lora, lora


def _widths_at(items: Sequence[PlanItem], keep: float, multiple: int = 1) -> list[int]:
    widths = [min(it.full_rank, max(1, int(round(keep * it.full_rank)))) for it in items]
    if multiple == 1:
        return widths
    return [w if w < multiple else min(it.full_rank // multiple, int(round(w / multiple))) * multiple
            for it, w in zip(items, widths)]


def _solve_keep(items: Sequence[PlanItem], fractions: Callable[[PlanItem], float], budget: int,
                multiple: int = 1) -> list[int]:
    """Widths (one scalar keep-fraction scaled per item) whose total parameter count is nearest ``budget``."""

    def total(keep: float) -> int:
        return sum(it.params_at(*_split(w, fractions(it)))
                   for it, w in zip(items, _widths_at(items, keep, multiple)))

    lo, hi = 0.0, 1.0
    for _ in range(60):  # the count is a monotone step function of keep: bisect to the step edge
        mid = (lo + hi) / 2
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda k: abs(total(k) - budget))
    return _widths_at(items, best, multiple)


def plan_ranks(config: CompressionConfig, items: Sequence[PlanItem]) -> dict[str, tuple[int, int] | None]:
    """Assign ``(rank, lora_rank)`` (or ``None``: leave alone) to each item.

    From ``ratio``: per component, the FFN keeps a fraction ``k_f`` and attention ``1 - 0.7·(1 - k_f)``
    of its full rank (the paper's split), the continuous solution fixes attention's widths, then the
    FFN widths are searched so the component's achieved parameter count lands nearest the target.
    Widths are rounded to ``config.width_multiple`` before the count is taken.
    """
    plan: dict[str, tuple[int, int] | None] = {}
    if config.ratio is not None:
        frac = {"attention": config.attention_lora_fraction, "ffn": config.ffn_lora_fraction}
        m = config.width_multiple
        for component in dict.fromkeys(it.component for it in items):
            group = [it for it in items if it.component == component]
            att = [it for it in group if it.kind == "attention"]
            ffn = [it for it in group if it.kind == "ffn"]
            before = sum(it.params_before for it in group)
            budget = int(round((1.0 - config.ratio) * before))
            a_before = sum(it.params_before for it in att)
            f_before = sum(it.params_before for it in ffn)
            # removed = ratio·(A + F) = A·c_a + F·c_f with c_a = factor·c_f
            c_f = config.ratio * before / (config.attention_factor * a_before + f_before)
            if ffn and c_f >= 1.0:
                raise ValueError(
                    f"ratio {config.ratio} is not reachable for component {component!r} with attention at "
                    f"{config.attention_factor}x the FFN's compression; lower ratio or raise attention_factor"
                )
            if att and ffn:
                att_widths = _widths_at(att, 1.0 - config.attention_factor * c_f, m)
                a_after = sum(it.params_at(*_split(w, frac["attention"])) for it, w in zip(att, att_widths))
                ffn_widths = _solve_keep(ffn, lambda it: frac["ffn"], budget - a_after, m)
            elif att:
                att_widths, ffn_widths = _solve_keep(att, lambda it: frac["attention"], budget, m), []
            else:
                att_widths, ffn_widths = [], _solve_keep(ffn, lambda it: frac["ffn"], budget, m)
            for it, w in zip(att, att_widths):
                plan[it.name] = _split(w, frac["attention"])
            for it, w in zip(ffn, ffn_widths):
                plan[it.name] = _split(w, frac["ffn"])
    else:
        for it in items:
            rank = config.attention_rank if it.kind == "attention" else config.ffn_rank
            lora = config.attention_lora_rank if it.kind == "attention" else config.ffn_lora_rank
            plan[it.name] = None if rank is None else (rank, lora or 0)

    for pattern, values in config.overrides.items():
        matched = [it for it in items if fnmatch.fnmatchcase(it.name, pattern)]
        if not matched:
            names = ", ".join(it.name for it in items[:6]) + (", ..." if len(items) > 6 else "")
            raise ValueError(f"override pattern {pattern!r} matches no compressible module; modules are: {names}")
        for it in matched:
            keys = _OVERRIDE_KEYS[:2] if it.kind == "attention" else _OVERRIDE_KEYS[2:]
            if not any(k in values for k in keys):
                continue
            rank, lora = plan.get(it.name) or (None, 0)
            if keys[0] in values:
                rank = values[keys[0]]
            if keys[1] in values:
                lora = values[keys[1]] or 0
            if rank is None and values.get(keys[1]):
                raise ValueError(f"override {pattern!r} gives {keys[1]} without {keys[0]} for {it.name}")
            plan[it.name] = None if rank is None else (rank, lora)
    return plan
