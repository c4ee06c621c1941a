"""``adaptwin inspect``: what a save directory holds, read from adaptwin.json and the weights file's header.

Also the small table and number formatters the other commands print with.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RANK_FLAGS = ("attention_rank", "attention_lora_rank", "ffn_rank", "ffn_lora_rank")


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = (), indent: int = 0) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return " " * indent + "  ".join(parts).rstrip()

    return "\n".join([line(header), " " * indent + "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def inspect_data(directory: str | os.PathLike) -> dict[str, Any]:
    """Everything `adaptwin inspect` shows, from ``adaptwin.json`` and the weights file's header (no weights
    are read)."""
    from adaptwin import read_meta

    meta = read_meta(directory)
    comp = meta["compression"]
    try:
        sites = []
        for row in comp["sites"]:
            before, after = int(row["params_before"]), int(row["params_after"])
            sites.append({
                "path": row["path"], "component": row["component"], "kind": row["kind"],
                "compressor": row["compressor"], "rank": row["rank"], "lora_rank": row["lora_rank"],
                "full_rank": row.get("full_rank"), "params_before": before, "params_after": after,
                "compression": 1 - after / before if before else 0.0,
            })
        components: dict[str, dict[str, Any]] = {}
        for s in sites:
            c = components.setdefault(s["component"], {"sites": 0, "params_before": 0, "params_after": 0})
            c["sites"] += 1
            c["params_before"] += s["params_before"]
            c["params_after"] += s["params_after"]
        components["total"] = {k: sum(c[k] for c in components.values())
                               for k in ("sites", "params_before", "params_after")}
        for c in components.values():
            c["compression"] = 1 - c["params_after"] / c["params_before"] if c["params_before"] else 0.0
        weights = meta["weights"]
        from adaptwin.io import read_tensor_layout

        layout = read_tensor_layout(directory)  # the weights header, read once
        modules = _module_storage(layout, comp["modules"])
        return {
            "path": str(Path(directory)),
            "architecture": comp["architecture"],
            "model_class": meta["model"].get("class"),
            "config": comp["config"],
            "sites": sites,
            "components": components,
            "weights": {k: weights.get(k) for k in ("file", "bytes", "tensors", "sha256")},
            "modules": modules,
            "original_dtype": _dense_dtype(layout, comp["modules"]),
            "shared": _shared_data(meta["aliases"]),
            "finetune": _finetune_data(comp.get("finetune")),
            "adaptations": list(comp.get("adaptations") or []),
        }
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{directory}: adaptwin.json is malformed (bad or missing field {e})") from None


def _module_storage(layout: dict[str, Any], modules: dict[str, Any]) -> list[dict[str, Any]]:
    """Per compressed module: parameters it represents, bytes stored and bits per parameter (weights header).

    A quantised module's parameters are its factors' logical count (recorded at packing); any other
    module's are the elements it stores.
    """
    rows = []
    for path, entry in modules.items():
        mine = [v for name, v in layout.items() if name.startswith(path + ".")]
        nbytes = sum(b for _, _, b in mine)
        packed = isinstance(entry["spec"].get("format"), dict)  # "quantized" and "pqm" record format and params
        params = entry["spec"].get("params") if packed else None
        if params is None:
            params = sum(math.prod(shape) for _, shape, _ in mine)
        rows.append({"path": path, "compressor": entry["compressor"], "layout": _describe(entry),
                     "format": entry["spec"]["format"].get("kind", "") + (" (tied)" if entry["spec"].get("tied_to")
                                                                          else "") if packed
                     else ",".join(sorted({dtype for dtype, _, _ in mine})),
                     "params": int(params), "bytes": int(nbytes),
                     "bits_per_param": 8 * nbytes / params if params else 0.0})
    return rows


def _describe(entry: dict[str, Any]) -> str:
    """The compressor's own short description of a module's spec ("" for a compressor not registered here)."""
    from adaptwin.registry import get_compressor

    try:
        return get_compressor(entry["compressor"]).describe(entry["spec"])
    except (KeyError, ValueError, TypeError, AttributeError):
        return ""


_ELEMENT_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}


def _dense_dtype(layout: dict[str, Any], modules: dict[str, Any]) -> str | None:
    """The floating dtype the save's uncompressed tensors (norms, embeddings) are stored in: the dtype the
    compressed modules' original weights had, for the size comparison. None if no such tensor is stored."""
    counts: dict[str, int] = {}
    for name, (dtype, shape, _) in layout.items():
        if dtype in _ELEMENT_BYTES and not any(name.startswith(p + ".") for p in modules):
            counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    return max(counts, key=counts.__getitem__) if counts else None


def _reduces(compressor: str) -> bool:
    """Whether the compressor exists to remove parameters (a compressor not registered here: assumed so)."""
    from adaptwin.registry import get_compressor

    try:
        return get_compressor(compressor).reduces_parameters
    except (KeyError, ValueError):
        return True


def _site_rank(site: dict[str, Any]) -> str:
    """"r+l" for a compressor that removes parameters; "LoRA r" for one that trades them for bytes (PQM)."""
    return f"{site['rank']}+{site['lora_rank']}" if _reduces(site["compressor"]) else f"LoRA {site['rank']}"


def _plan(cfg: dict[str, Any], sites: list[dict[str, Any]]) -> str:
    """One line on how the save was compressed: the ratio or ranks, and the product twins only where a
    product-twin site exists (PQM: its NF4 base and LoRA rank instead)."""
    parts = []
    if any(_reduces(s["compressor"]) for s in sites):
        parts.append(f"ratio {cfg['ratio']}" if cfg.get("ratio") is not None else
                     "ranks " + ", ".join(f"{k}={cfg.get(k)}" for k in RANK_FLAGS if cfg.get(k) is not None))
    if any(s["compressor"] == "pqm" for s in sites):
        pqm = (cfg.get("method_options") or {}).get("pqm") or {}
        ranks = sorted({s["rank"] for s in sites if s["compressor"] == "pqm"})
        kinds = sorted({s["kind"] for s in sites if s["compressor"] == "pqm"})
        parts.append(f"pqm: NF4 base (block {pqm.get('blocksize', 64)}"
                     f"{', double quant' if pqm.get('double_quant') else ''}) + LoRA rank "
                     f"{'/'.join(map(str, ranks))} on {', '.join(kinds)}")
    if cfg.get("overrides"):
        parts.append(f"{len(cfg['overrides'])} override(s)")
    if any(s["compressor"] == "product_twin" for s in sites):
        parts.append(f"twins {','.join(cfg.get('twins') or [])}")
    if cfg.get("quantization"):
        parts.append(f"{cfg['quantization']}-quantised")
    return ", ".join(parts)


def _shared_data(aliases: dict[str, str]) -> list[dict[str, Any]]:
    """Tensors stored once and used under several names (tied embeddings, residual groups' shared matrices)."""
    users: dict[str, list[str]] = {}
    for alias, stored in aliases.items():
        users.setdefault(stored, []).append(alias)
    return [{"stored": k, "also": sorted(v)} for k, v in sorted(users.items())]


def _finetune_data(ft: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fine-tuning settings, per-layer errors and layer selection recorded in a save (None if not fine-tuned)."""
    if not ft:
        return None
    keys = ("path", "error_before", "error_after", "epochs", "best_epoch", "reverted")
    return {"config": ft.get("config", {}), "layers": [{k: row.get(k, False if k == "reverted" else None)
                                                        for k in keys} for row in ft.get("layers", [])],
            "selection": ft.get("selection")}


def cmd_inspect(args: argparse.Namespace) -> int:
    data = inspect_data(args.dir)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(f"{data['path']}: {data['model_class']} ({data['architecture']}), {_plan(data['config'], data['sites'])}")
    rows = [(s["path"], s["compressor"], _site_rank(s), _fmt_int(s["params_before"]),
             _fmt_int(s["params_after"]), f"{100 * s['compression']:.1f} %") for s in data["sites"]]
    print(_table(("module", "compressor", "rank", "params before", "params after", "removed"), rows,
                 right=(2, 3, 4, 5)))
    print()
    rows = [(name, str(c["sites"]), _fmt_int(c["params_before"]), _fmt_int(c["params_after"]),
             f"{100 * c['compression']:.1f} %") for name, c in data["components"].items()]
    print(_table(("component", "sites", "params before", "params after", "removed"), rows, right=(1, 2, 3, 4)))
    print()
    mods = data["modules"]
    rows = [(m["path"], m["format"], m["layout"], _fmt_int(m["params"]), _fmt_int(m["bytes"]),
             f"{m['bits_per_param']:.2f}" if m["params"] else "-") for m in mods]
    params, nbytes = sum(m["params"] for m in mods), sum(m["bytes"] for m in mods)
    rows.append(("total (compressed modules)", "", "", _fmt_int(params), _fmt_int(nbytes),
                 f"{8 * nbytes / params:.2f}" if params else "-"))
    print(_table(("module", "stored as", "layout", "params", "bytes", "bits/param"), rows, right=(3, 4, 5)))
    dense = data["original_dtype"]
    before = data["components"]["total"]["params_before"]
    if dense and before and nbytes:
        size = before * _ELEMENT_BYTES[dense]
        print(f"size: their original {_fmt_int(before)} parameters in {dense} {_fmt_bytes(size)}, stored now "
              f"{_fmt_bytes(nbytes)} ({size / nbytes:.2f}x smaller)")
    if data["shared"]:
        print("\nshared tensors (stored once, used by every module listed; counted in the first):")
        print(_table(("stored as", "also used as"), [(s["stored"], ", ".join(s["also"])) for s in data["shared"]],
                     indent=2))
    w = data["weights"]
    print(f"weights: {w['file']}, {_fmt_int(w['bytes'])} bytes ({_fmt_bytes(w['bytes'])}), {w['tensors']} tensors")
    ft = data["finetune"]
    if ft is not None:
        c, layers = ft["config"], ft["layers"]
        errors = [(r["error_before"], r["error_after"]) for r in layers if r["error_after"] is not None]
        span = (f"; relative output error per layer {min(b for b, _ in errors):.4f}-{max(b for b, _ in errors):.4f}"
                f" -> {min(a for _, a in errors):.4f}-{max(a for _, a in errors):.4f}") if errors else ""
        print(f"fine-tuned {len(layers)} layers: mode {c.get('mode')}, init {c.get('init')}, lr {c.get('lr')}, "
              f"up to {c.get('epochs')} epochs{span}"
              + (" (measured before the adaptation below changed the LoRA factors)" if data["adaptations"] else ""))
        sel = ft["selection"]
        if sel:
            budget = ", ".join(f"{k} {sel[k]:g}" for k in ("keep_size", "max_error") if sel.get(k) is not None)
            print(f"selection ({budget}): {len(sel['reverted'])} layer(s) reverted to the original "
                  f"({', '.join(sel['reverted']) or 'none'}); targeted parameters kept {_fmt_int(sel['params_kept'])} "
                  f"of {_fmt_int(sel['params_original'])} ({100 * sel['keep_fraction']:.1f} %)")
    for i, a in enumerate(data["adaptations"], 1):
        who = (f"{a['utterances']} utterances ({', '.join(a.get('speakers') or [])}) of {a['data']}, "
               if "utterances" in a and "data" in a else f"{a.get('batches')} batches, ")
        kept = f", held-out loss kept epoch {a['best_epoch']}" if a.get("best_epoch") is not None else ""
        print(f"adapted ({i} of {len(data['adaptations'])}, PQM LoRA, the model's own loss): {who}"
              f"{a.get('epochs')} epochs, lr {a.get('lr'):g}, loss {a.get('loss_before', float('nan')):.4f} -> "
              f"{a.get('loss_after', float('nan')):.4f}{kept}")
    return 0


# ---------------------------------------------------------------------------------------------- list
