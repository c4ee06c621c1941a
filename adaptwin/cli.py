"""The ``adaptwin`` command: compress a Hugging Face model folder, inspect a save, list what is registered.

    adaptwin compress MODEL_DIR --out DIR --ratio 0.45
    adaptwin inspect DIR [--json]
    adaptwin list [--json]

This room parses arguments and prints; the maths lives behind the public API. User errors (bad ranks,
missing folders, unsupported models, a DIR that is not an adaptwin save) end with one line on stderr
and exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2

# Files a tokenizer, feature extractor or generation loop needs beside the weights; copied into the save.
EXTRA_FILE_PATTERNS = (
    "tokenizer*.json", "tokenizer.model", "vocab*", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "spiece.model", "sentencepiece*.model", "*.tiktoken", "normalizer.json",
    "preprocessor_config.json", "processor_config.json", "feature_extractor_config.json",
    "generation_config.json", "chat_template.json", "chat_template.jinja",
)
_RANK_FLAGS = ("attention_rank", "attention_lora_rank", "ffn_rank", "ffn_lora_rank")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class UsageError(ValueError):
    """A problem with what the user asked for (reported in one line, exit status 2)."""


# ---------------------------------------------------------------------------------------------- parsing


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. encoder,decoder")
    return items


def parse_override(text: str) -> tuple[str, dict[str, int | None]]:
    """``"PATTERN=key:val,key:val"`` → ``(PATTERN, {key: int or None})``; ``none`` leaves a module alone."""
    pattern, sep, body = text.rpartition("=")
    if not sep or not pattern or not body:
        raise UsageError(f"--override {text!r} must look like PATTERN=key:val[,key:val...], "
                         f"e.g. 'encoder.layer.0.*=attention_rank:8,attention_lora_rank:2'")
    values: dict[str, int | None] = {}
    for item in body.split(","):
        key, sep, val = (s.strip() for s in item.partition(":"))
        key = key.replace("-", "_")
        if not sep or key not in _RANK_FLAGS:
            raise UsageError(f"--override {text!r}: {item!r} is not key:val with key one of {list(_RANK_FLAGS)}")
        if val.lower() == "none":
            values[key] = None
        elif re.fullmatch(r"\d+", val):
            values[key] = int(val)
        else:
            raise UsageError(f"--override {text!r}: {key} must be a whole number or 'none', got {val!r}")
    return pattern, values


def build_parser() -> argparse.ArgumentParser:
    from adaptwin import __version__

    parser = argparse.ArgumentParser(
        prog="adaptwin",
        description="Compress Hugging Face transformers with AdaPTwin product twins (arXiv 2406.08904).",
    )
    parser.add_argument("--version", action="version", version=f"adaptwin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{compress,inspect,list}")

    c = sub.add_parser("compress", help="compress a model folder (or hub id) and save it",
                       description="Compress a Hugging Face model and save weights, config and tokenizer files.")
    c.add_argument("model", metavar="MODEL_DIR", help="local Hugging Face model folder, or a hub id")
    c.add_argument("--out", required=True, metavar="DIR", help="save directory (created; an old adaptwin save "
                   "there is replaced, any other non-empty folder is refused)")
    c.add_argument("--ratio", type=float, help="fraction in (0, 1) of the targeted parameters to remove, "
                   "planned per component with attention at 0.7x the FFN's compression")
    for flag in _RANK_FLAGS:
        c.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=int, metavar="N",
                       help=f"explicit {flag.replace('_', ' ')} (instead of --ratio)")
    c.add_argument("--components", type=_csv, metavar="LIST", help="components to compress, e.g. encoder,decoder "
                   "(default: all the architecture has)")
    c.add_argument("--twins", type=_csv, metavar="LIST", help="product twins to form: qk,vo (default); "
                   "rotary models (llama) need vo")
    c.add_argument("--override", action="append", default=[], metavar="PATTERN=key:val,...",
                   help="per-module ranks after planning, e.g. 'model.encoder.layers.0.*=ffn_rank:none' "
                   f"(keys: {', '.join(_RANK_FLAGS)}; repeatable)")
    c.add_argument("--seed", type=int, default=0, help="seed of the LoRA factors' initialisation (default 0)")

    i = sub.add_parser("inspect", help="show what a save directory holds (reads adaptwin.json only)",
                       description="Per-site ranks and parameter counts of an adaptwin save; no weights are loaded.")
    i.add_argument("dir", metavar="DIR", help="an adaptwin save directory")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    ls = sub.add_parser("list", help="registered compressors and architectures")
    ls.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


# ---------------------------------------------------------------------------------------------- compress


def _config_from_args(args: argparse.Namespace):
    from adaptwin import CompressionConfig

    overrides = dict(parse_override(text) for text in args.override)
    kwargs: dict[str, Any] = {k: getattr(args, k) for k in _RANK_FLAGS if getattr(args, k) is not None}
    if args.twins is not None:
        kwargs["twins"] = args.twins
    return CompressionConfig(ratio=args.ratio, components=args.components, overrides=overrides,
                             seed=args.seed, **kwargs)


def _check_out_dir(out: Path, model_dir: Path | None) -> None:
    """Refuse a target `save` would refuse, before spending minutes on compression."""
    from adaptwin.io import CONFIG_NAME

    if model_dir is not None and out.resolve() == model_dir.resolve():
        raise UsageError(f"--out {out} is the model folder itself; choose a new directory")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
            raise UsageError(f"--out {out} is a non-empty directory that is not an adaptwin save; "
                             "choose a new or empty directory")


def _resolve_model(name: str) -> Path | None:
    """The local folder for MODEL_DIR, or None when it is a hub id; raises for a missing local folder."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"MODEL_DIR {name} is a file; pass the folder holding config.json")
        if not (path / "config.json").is_file():
            raise UsageError(f"MODEL_DIR {name} has no config.json; pass a Hugging Face model folder "
                             "(written by save_pretrained)")
        return path
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise UsageError(f"MODEL_DIR {name} does not exist (expected a local model folder or a hub id like org/name)")
    return None


def extra_files(folder: Path) -> list[Path]:
    """Tokenizer / feature-extractor / generation files in ``folder`` (never the weights or config)."""
    found: dict[str, Path] = {}
    for pattern in EXTRA_FILE_PATTERNS:
        for p in sorted(folder.glob(pattern)):
            if p.is_file() and p.name not in ("adaptwin.json", "model.safetensors"):
                found[p.name] = p
    return sorted(found.values())


def _hub_extra_files(repo_id: str) -> list[Path]:
    try:
        from huggingface_hub import snapshot_download

        return extra_files(Path(snapshot_download(repo_id, allow_patterns=list(EXTRA_FILE_PATTERNS))))
    except Exception as e:  # the model loaded; missing tokenizer files are worth a warning, not a failure
        _note(f"warning: could not fetch tokenizer files of {repo_id}: {_one_line(e)}")
        return []


def load_model(source: str):
    """Load a Hugging Face model in fp32 with the class its config names, falling back to AutoModel."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel

    from adaptwin import get_architecture

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"cannot read the model config of {source}: {_one_line(e)}") from None
    get_architecture(config.model_type)  # unsupported model types stop here, before any weights are read
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        cls = AutoModel
    try:
        model = cls.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the model weights of {source}: {_one_line(e)}") from None
    return model.float().eval()


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_compress(args: argparse.Namespace) -> int:
    import adaptwin

    config = _config_from_args(args)  # bad ratios, ranks, twins and overrides fail here, in milliseconds
    local = _resolve_model(args.model)
    out = Path(args.out).expanduser()
    _check_out_dir(out, local)
    source = str(local) if local is not None else args.model

    _disable_progress_bars()
    t0 = time.perf_counter()
    _note(f"loading {source} ...")
    model = load_model(source)
    t1 = time.perf_counter()
    _note(f"compressing {type(model).__name__} ({model.config.model_type}) ...")
    small = adaptwin.compress(model, config, inplace=True)
    t2 = time.perf_counter()
    extras = extra_files(local) if local is not None else _hub_extra_files(args.model)
    adaptwin.save(small, out, extra_files=extras)
    t3 = time.perf_counter()

    record = adaptwin.compression_record(small)
    summary = record.summary()
    print(f"{type(small).__name__} ({record.architecture}) -> {out}")
    rows = [(name, _fmt_int(s["params_before"]), _fmt_int(s["params_after"]), f"{100 * s['compression']:.1f} %")
            for name, s in summary.items()]
    print(_table(("component", "params before", "params after", "removed"), rows, right=(1, 2, 3)))
    if config.ratio is not None:
        achieved = summary["total"]["compression"]
        print(f"target {100 * config.ratio:.1f} % removed, achieved {100 * achieved:.2f} % "
              f"(of attention + FFN parameters in {', '.join(n for n in summary if n != 'total')})")
    else:
        print("explicit ranks (no target ratio)")
    written = sorted(p for p in out.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} files, {_fmt_bytes(size)}: {', '.join(p.name for p in written)}")
    print(f"time: load {t1 - t0:.1f} s, compress {t2 - t1:.1f} s, save {t3 - t2:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------- inspect


def inspect_data(directory: str | os.PathLike) -> dict[str, Any]:
    """Everything `adaptwin inspect` shows, from ``adaptwin.json`` alone (the weights are not opened)."""
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
        return {
            "path": str(Path(directory)),
            "architecture": comp["architecture"],
            "model_class": meta["model"].get("class"),
            "config": comp["config"],
            "sites": sites,
            "components": components,
            "weights": {k: weights.get(k) for k in ("file", "bytes", "tensors", "sha256")},
        }
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{directory}: adaptwin.json is malformed (bad or missing field {e})") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    data = inspect_data(args.dir)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    cfg = data["config"]
    plan = (f"ratio {cfg['ratio']}" if cfg.get("ratio") is not None else
            "ranks " + ", ".join(f"{k}={cfg.get(k)}" for k in _RANK_FLAGS if cfg.get(k) is not None))
    if cfg.get("overrides"):
        plan += f", {len(cfg['overrides'])} override(s)"
    print(f"{data['path']}: {data['model_class']} ({data['architecture']}), {plan}, "
          f"twins {','.join(cfg.get('twins') or [])}")
    rows = [(s["path"], s["compressor"], f"{s['rank']}+{s['lora_rank']}", _fmt_int(s["params_before"]),
             _fmt_int(s["params_after"]), f"{100 * s['compression']:.1f} %") for s in data["sites"]]
    print(_table(("module", "compressor", "r+l", "params before", "params after", "removed"), rows, right=(2, 3, 4, 5)))
    print()
    rows = [(name, str(c["sites"]), _fmt_int(c["params_before"]), _fmt_int(c["params_after"]),
             f"{100 * c['compression']:.1f} %") for name, c in data["components"].items()]
    print(_table(("component", "sites", "params before", "params after", "removed"), rows, right=(1, 2, 3, 4)))
    w = data["weights"]
    print(f"weights: {w['file']}, {_fmt_int(w['bytes'])} bytes ({_fmt_bytes(w['bytes'])}), {w['tensors']} tensors")
    return 0


# ---------------------------------------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace) -> int:
    from adaptwin import get_architecture, get_compressor, list_architectures, list_compressors

    compressors = [{"name": n, "site_kind": getattr(get_compressor(n), "site_kind", None)}
                   for n in list_compressors()]
    architectures = []
    for t in list_architectures():
        adapter = get_architecture(t)
        architectures.append({"model_type": t, "components": list(adapter.components),
                              "adapter": type(adapter).__name__})
    if args.json:
        print(json.dumps({"compressors": compressors, "architectures": architectures}, indent=1))
        return 0
    print("compressors:")
    print(_table(("name", "sites"), [(c["name"], str(c["site_kind"])) for c in compressors], indent=2))
    print("architectures (HF model_type):")
    print(_table(("model_type", "components", "adapter"),
                 [(a["model_type"], ",".join(a["components"]), a["adapter"]) for a in architectures], indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- helpers


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = (), indent: int = 0) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return " " * indent + "  ".join(parts).rstrip()

    return "\n".join([line(header), " " * indent + "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _disable_progress_bars() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


_COMMANDS = {"compress": cmd_compress, "inspect": cmd_inspect, "list": cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input) instead of exiting, so tests can call it."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the problem
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:  # `adaptwin list | head`: the reader left; not an error worth a message
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"adaptwin {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("adaptwin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
