"""A source distribution carries what building the extension from it needs."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_sdist_holds_every_native_source_and_the_headers_they_include(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0 or not tracked.stdout:
        pytest.skip("not a git checkout")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = tmp_path.glob("adaptwin-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert "Makefile" in names
    wanted = set(tracked.stdout.split())
    assert wanted <= names, sorted(wanted - names)
    for path in wanted:  # every local include of every native file resolves inside the sdist
        for inc in re.findall(r'^#include "([^"]+)"', (ROOT / path).read_text(), re.M):
            target = (Path(path).parent / inc).as_posix()
            parts: list[str] = []
            for part in target.split("/"):
                parts = parts[:-1] if part == ".." else [*parts, part]
            assert "/".join(parts) in names, f"{path} includes {inc}, which the sdist lacks"
