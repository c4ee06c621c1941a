"""The benchmark speech recogniser: a Whisper-architecture model trained from scratch on spoken digits.

    python -m benchmarks.digits.make_sets --data ../shared/data/fsdd --out results/digits/sets
    python -m benchmarks.digits.train --data ../shared/data/fsdd --out results/digits/model
    adaptwin eval results/digits/model --data results/digits/sets/test.jsonl

No pretrained Whisper checkpoint can be had on the project's machines, so the dense-vs-compressed WER
benchmarks use this model: real recordings (FSDD), held-out takes, and a size with something to remove.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from adaptwin._files import give_default_modes, remove_dead_temps, replace_dir, temp_prefix

__all__ = ["atomic_dir"]


class atomic_dir:  # noqa: N801 - used like a function: ``with atomic_dir(out) as tmp: ...``
    """A temporary folder beside ``target`` that replaces ``target`` (by rename) when the block succeeds.

    On an exception the temporary folder is removed and ``target`` is left as it was.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target).expanduser().resolve()

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(self.target.parent, self.target.name)  # what a run killed mid-write left
        self.tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(self.target.name), dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        give_default_modes(self.tmp)  # mkdtemp makes it 0700, save_pretrained's safetensors 0600
        replace_dir(self.tmp, self.target)
