"""The command line's structured flags and its wording: ``--override PATTERN=key:val``, ``--method-option
NAME.KEY=VALUE``, comma lists, and the library's errors reworded in flag syntax (`in_flag_words`).

The library's errors name Python keywords (``double_quant=False``); on the command line the same problem
reads in flags (``no --double-quant``).
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from adaptwin.inspection import RANK_FLAGS as _RANK_FLAGS
from adaptwin.sources import UsageError


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


def parse_method_option(text: str) -> tuple[str, str, Any]:
    """``"NAME.KEY=VALUE"`` → ``(NAME, KEY, value)``: VALUE is read as JSON (2, 0.5, true, {"ffn": 3}), and
    a bare word that is not JSON is taken as a string (``residual.init=mean``)."""
    head, sep, raw = text.partition("=")
    name, dot, key = head.strip().partition(".")
    if not sep or not dot or not name or not key or not raw.strip():
        raise UsageError(f"--method-option {text!r} must look like NAME.KEY=VALUE, e.g. residual.group_size=2 or "
                         "'residual.group_size={\"attention\": 2, \"ffn\": 3}'")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw.strip()
    return name.strip(), key.strip(), value


def _site_kinds(name: str) -> tuple[str, ...]:
    from adaptwin.registry import get_compressor

    kinds = getattr(get_compressor(name), "site_kind", None)
    return kinds if isinstance(kinds, tuple) else (kinds,)


# Config fields named differently on the command line (`QuantFormat(kind=...)` is `--quantization`).
_FLAG_ALIASES = {"kind": "quantization"}


def _command_flags(parser: argparse.ArgumentParser, command: str) -> set[str]:
    """The option names (``dest``) one subcommand takes, e.g. {"ratio", "double_quant", ...}."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return {a.dest for a in action.choices[command]._actions if a.option_strings}
    return set()


def _method_options_flags(m: re.Match) -> str:
    import ast

    try:
        options = ast.literal_eval(m.group(1))
    except (ValueError, SyntaxError):
        return m.group(0)
    if not (isinstance(options, dict) and all(isinstance(v, dict) for v in options.values())):
        return m.group(0)
    return " ".join(f"--method-option {name}.{key}={json.dumps(value)}"
                    for name, opts in options.items() for key, value in opts.items())


def in_flag_words(message: str, flags: set[str]) -> str:
    """An API error reworded for the command line, for the fields that are flags of this command.

    The library's errors name Python keywords (``double_quant=False``, ``twins=('vo',)``,
    ``quantization='nf4'``, ``attention_rank=...``); on the command line they read ``no --double-quant``,
    ``--twins vo``, ``--quantization nf4``, ``--attention-rank N``. Fields that are not flags stay as they are.
    """
    if "override" in message:  # --override PATTERN=key:val uses the field names themselves
        return message

    def flag(name: str) -> str | None:
        name = _FLAG_ALIASES.get(name, name)
        return "--" + name.replace("_", "-") if name in flags else None

    def keyword(m: re.Match) -> str:
        f = flag(m.group(1))
        if f is None:
            return m.group(0)
        value = m.group(2)
        if value == "True":
            return f
        if value in ("False", "None"):
            return f"no {f}"
        if value == "...":
            return f"{f} N"
        if value.startswith("("):  # a tuple: twins=('qk', 'vo') -> --twins qk,vo
            return f"{f} " + ",".join(re.findall(r"'([^']*)'", value))
        return f"{f} {value.strip(chr(39))}"

    if "method_option" in flags:  # method_options={'pqm': {'blocksize': 64}} -> --method-option pqm.blocksize=64
        message = re.sub(r"method_options=(\{'[^{}]*\{[^{}]*\}\s*\})", _method_options_flags, message)
    message = re.sub(r"(?<![\w.'-])([a-z][a-z0-9_]*)=(\([^)]*\)|'[^']*'|\.\.\.|[\w.+-]+)", keyword, message)
    # a value list after a flag: --quantization nf4 or 'int8' -> --quantization nf4 or int8
    message = re.sub(r"(--[a-z][\w-]* [\w.]+ or )'([^']*)'", r"\1\2", message)
    # bare field names with an underscore (quant_blocksize, double_quant): plain words like "ratio" stay prose
    return re.sub(r"(?<![\w.'-])([a-z][a-z0-9]*_[a-z0-9_]+)\b(?![=(])",
                  lambda m: flag(m.group(1)) or m.group(0), message)
