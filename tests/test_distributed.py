"""torchrun: layers spread over 2 CPU processes (gloo) give the same weights as one process, bit for bit.

In independent mode each layer trains on the original model's inputs with its own seed, so which rank
trains it cannot matter; rank r trains layers r, r+2, ... and every rank assembles all of them from the
run directory. The job (tests/_finetune_job.py) runs each process on one thread.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

JOB = Path(__file__).with_name("_finetune_job.py")
ARGS = ("--layers", "3", "--epochs", "15")
TIMEOUT = 300

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and importlib.util.find_spec("torch.distributed.run")),
    reason="torch.distributed with gloo (and torchrun) is not available",
)


def torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def run(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def weights(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def job(run_dir: Path | None, out: Path) -> list[str]:
    return [str(JOB), "--run-dir", str(run_dir) if run_dir else "none", "--out", str(out), *ARGS]


def assert_same(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"2-process weights differ from 1-process in {different[:5]}"


def env_one_thread(tmp: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return env


def test_two_processes_match_one(tmp_path):
    one = run([sys.executable, *job(tmp_path / "run1", tmp_path / "one")])
    two = run([*torchrun(), "--standalone", "--nproc-per-node", "2", *job(tmp_path / "run2", tmp_path / "two")],
              env_one_thread())
    assert one["world"] == 1 and two["world"] == 2 and two["layers"] == one["layers"]
    assert_same(tmp_path / "one", tmp_path / "two")
    assert len(list((tmp_path / "run2" / "layers").glob("*.safetensors"))) == 3  # both ranks wrote theirs


@pytest.mark.slow
def test_two_processes_without_run_dir(tmp_path):
    """Without run_dir the ranks agree on a temporary folder, exchange layers through it and remove it."""
    one = run([sys.executable, *job(tmp_path / "run1", tmp_path / "one")])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    two = run([*torchrun(), "--standalone", "--nproc-per-node", "2", *job(None, tmp_path / "two")],
              env_one_thread(scratch))
    assert two["world"] == 2 and two["layers"] == one["layers"]
    assert_same(tmp_path / "one", tmp_path / "two")
    assert not [p for p in scratch.iterdir() if p.name.startswith("adaptwin-run-")]
