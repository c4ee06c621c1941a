"""Extra real English calibration text, harvested from the running Python's standard-library docstrings.

    python -m benchmarks.stdlib_text --out results/stdlib_sentences.txt

The sentences shipped with the package (`adaptwin/data/calibration_sentences.txt`, ~5k tokens) are few;
this writes ~1,800 more (about 34k MiniLM tokens) from prose every Python installation carries (PSF
licence), without copying any of it into the repository. Prose only: paragraphs with doctest prompts,
literal blocks or indented code are skipped, and a sentence must have 8-40 words, start with a capital,
end with . ! or ?, and hold no code-like characters. The count depends on the Python version (3.11.7
here gives 1,780); the order is shuffled with a fixed seed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import random
import re
import sys
import tempfile
import warnings
from pathlib import Path

from adaptwin._files import give_default_mode

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "pydoc_data",
        "ensurepip", "venv", "__main__"}
CODE = re.compile(r"[_=(){}\[\]<>`*#/\\@$%^~]|\w\.\w|--")
LITERAL = re.compile(r"(>>>|::|\|  |^\s{2,})", re.M)
SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
PROSE = set(" ,.'-;:!?")


def docstrings() -> list[str]:
    """Docstrings of the stdlib modules and of the objects they define (sorted module order)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name in SKIP or name.startswith("_"):
                continue
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - platform-specific modules (winreg, ...) are simply absent
                continue
            objs = [mod] + [o for n, o in vars(mod).items() if not n.startswith("_")
                            and getattr(o, "__module__", None) == name]
            out.extend(d for d in (inspect.getdoc(o) for o in objs) if d)
    return out


def sentences(docs: list[str], seed: int = 0) -> list[str]:
    found = set()
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            if LITERAL.search(para):
                continue
            for s in SPLIT.split(" ".join(para.split())):
                words = s.split()
                if not 8 <= len(words) <= 40 or not s[0].isupper() or s[-1] not in ".!?" or CODE.search(s):
                    continue
                if sum(c.isalpha() or c in PROSE for c in s) / len(s) >= 0.97:
                    found.add(s)
    out = sorted(found)
    random.Random(seed).shuffle(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/stdlib_sentences.txt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lines = sentences(docstrings(), args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    give_default_mode(tmp)  # mkstemp makes it 0600
    os.replace(tmp, out)
    print(f"{len(lines)} sentences from Python {sys.version.split()[0]}'s docstrings -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
