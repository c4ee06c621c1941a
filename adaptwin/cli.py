"""The ``adaptwin`` command: compress a Hugging Face model folder, inspect a save, list what is registered.

    adaptwin compress MODEL_DIR --out DIR --ratio 0.45      (see adaptwin/compress_cli.py)
    adaptwin compress MODEL_DIR --out DIR --ratio 0.45 --calib DATA --epochs 40 [--keep-size 0.6]
    torchrun --nproc-per-node N -m adaptwin compress ...      (fine-tuned layers spread over N ranks)
    adaptwin inspect DIR [--json]
    adaptwin list [--json]
    adaptwin eval MODEL_DIR --data PATH [--json]      (word error rate; see adaptwin/speech/cli.py)
    adaptwin adapt MODEL_DIR --data PATH --out DIR    (PQM speaker adaptation; see adaptwin/speech/adapt_cli.py)

This room parses arguments and prints; the maths lives behind the public API. User errors (bad ranks,
missing folders, unsupported models, a DIR that is not an adaptwin save) end with one line on stderr
and exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence

from adaptwin.compress_cli import add_parser as add_compress_parser
from adaptwin.compress_cli import cmd_compress
from adaptwin.flags import _command_flags, in_flag_words, parse_method_option, parse_override  # noqa: F401 - public here too
from adaptwin.inspection import _table, cmd_inspect, inspect_data  # noqa: F401 - inspect_data: public here too
from adaptwin.sources import one_line
from adaptwin.speech.adapt_cli import add_parser as add_adapt_parser
from adaptwin.speech.adapt_cli import cmd_adapt
from adaptwin.speech.cli import add_parser as add_eval_parser
from adaptwin.speech.cli import cmd_eval

EXIT_USAGE = 2


# ---------------------------------------------------------------------------------------------- parsing


def build_parser() -> argparse.ArgumentParser:
    from adaptwin import __version__

    parser = argparse.ArgumentParser(
        prog="adaptwin",
        description="Compress Hugging Face transformers with AdaPTwin product twins (arXiv 2406.08904).",
    )
    parser.add_argument("--version", action="version", version=f"adaptwin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{compress,inspect,list,eval,adapt}")

    add_compress_parser(sub)
    i = sub.add_parser("inspect", help="show what a save directory holds (reads adaptwin.json and the "
                       "weights header only)",
                       description="Per-site ranks and parameter counts of an adaptwin save; no weights are loaded.")
    i.add_argument("dir", metavar="DIR", help="an adaptwin save directory")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    ls = sub.add_parser("list", help="registered compressors and architectures")
    ls.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_eval_parser(sub)
    add_adapt_parser(sub)
    return parser


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
    print(_table(("name", "sites"), [(c["name"], "/".join(c["site_kind"]) if isinstance(c["site_kind"], tuple)
                                      else str(c["site_kind"])) for c in compressors], indent=2))
    print("architectures (HF model_type):")
    print(_table(("model_type", "components", "adapter"),
                 [(a["model_type"], ",".join(a["components"]), a["adapter"]) for a in architectures], indent=2))
    return 0



_COMMANDS = {"compress": cmd_compress, "inspect": cmd_inspect, "list": cmd_list, "eval": cmd_eval, "adapt": cmd_adapt}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input) instead of exiting, so tests can call it."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the problem
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    flags = _command_flags(parser, args.command)
    show = warnings.showwarning  # a warning is one line on stderr, not the library's source line

    def one_line_warning(message, category, *rest, **kw) -> None:
        print(f"adaptwin {args.command}: warning: {in_flag_words(' '.join(str(message).split()), flags)}",
              file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:  # `adaptwin list | head`: the reader left; not an error worth a message
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, OSError) as e:
        message = in_flag_words(one_line(e), flags)
        print(f"adaptwin {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("adaptwin: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
