"""Kill-and-resume: a fine-tuning run killed with SIGKILL anywhere and rerun ends with the same weights.

tests/_finetune_job.py compresses and fine-tunes a 3-layer BERT (~1 s of training per layer) with a
run directory. The run is killed at points found by polling the run directory, rerun with the same
command until it finishes, and its weights compared bit for bit with an uninterrupted run's. The job
runs on one thread with fixed seeds, so the only way to differ is a resume that is not exact.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

JOB = Path(__file__).with_name("_finetune_job.py")
ARGS = ("--layers", "3", "--epochs", "30")
LAYERS = [f"encoder.layer.{i}" for i in range(3)]
TIMEOUT = 300  # seconds per job run (a run takes ~10 s on a loaded 2-core machine)


def command(run_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(JOB), "--run-dir", str(run_dir), "--out", str(out), *ARGS, *extra]


def finish(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name.removesuffix(".safetensors") for p in (run_dir / "layers").glob("*.safetensors")
                  if not p.name.startswith("."))


def kill_when(cmd: list[str], run_dir: Path, ready) -> list[str]:
    """Start ``cmd``, SIGKILL it as soon as ``ready(run_dir)`` holds; the checkpoints present at the kill."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready(run_dir):
            if proc.poll() is not None:
                pytest.fail(f"the job ended before the kill point (rc {proc.returncode}): "
                            f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the kill point never came")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return checkpoints(run_dir)


def weights(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's in {different[:5]}"


def assert_clean(run_dir: Path) -> None:
    """No temporaries anywhere under the run directory, and every checkpoint loads whole."""
    stray = [p for p in run_dir.rglob("*") if p.is_file() and (p.name.startswith(".") or "tmp" in p.name)]
    assert not stray, f"temporary files left behind: {stray}"
    assert checkpoints(run_dir) == LAYERS
    for name in LAYERS:
        with safe_open(str(run_dir / "layers" / f"{name}.safetensors"), framework="pt") as f:
            assert json.loads(f.metadata()["result"])["path"] == name
            assert all(f.get_tensor(k).numel() for k in f.keys())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[tuple[str, ...], Path]:
    """Uninterrupted runs' outputs, one per extra argument tuple, computed on first use."""
    root = tmp_path_factory.mktemp("reference")
    cache: dict[tuple[str, ...], Path] = {}

    def get(*extra: str) -> Path:
        if extra not in cache:
            out = root / f"out{len(cache)}"
            report = finish(command(root / f"run{len(cache)}", out, *extra))
            assert report["resumed"] == [] and report["layers"] == LAYERS
            cache[extra] = out
        return cache[extra]

    return get


def test_killed_after_a_checkpoint_resumes_exactly(tmp_path, reference):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    cmd = command(run_dir, out)
    done = kill_when(cmd, run_dir, lambda d: len(checkpoints(d)) >= 1)  # killed as layer 1 starts
    assert 1 <= len(done) < len(LAYERS)
    report = finish(cmd)
    assert report["resumed"] == done  # the finished layers are loaded, not retrained
    assert_identical(out, reference())
    assert_clean(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--sequential", "--storage", "disk")], ids=["independent", "sequential-disk"])
def test_killed_anywhere_resumes_exactly(tmp_path, reference, extra):
    """Killed during the capture (no checkpoint yet), then mid-layer (half a layer's time after a checkpoint),
    then run to the end. Sequential mode is the demanding case: a resumed layer's inputs come from the
    layers loaded back from checkpoints, so any inexact load would show in every later layer."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    cmd = command(run_dir, out, *extra)
    assert kill_when(cmd, run_dir, lambda d: (d / "run.json").exists()) == []
    stamps: dict[int, float] = {}

    def mid_layer(d: Path) -> bool:
        n = len(checkpoints(d))
        stamps.setdefault(n, time.monotonic())
        if n < 2:
            return False
        layer_seconds = stamps[2] - stamps.get(1, stamps[2])  # 0 if a stalled poller missed checkpoint 1
        return time.monotonic() - stamps[2] >= 0.5 * layer_seconds

    done = kill_when(cmd, run_dir, mid_layer)
    assert done == LAYERS[:2]
    report = finish(cmd)
    assert report["resumed"] == LAYERS[:2]
    assert_identical(out, reference(*extra))
    assert_clean(run_dir)


# --------------------------------------------------------------------------------- in-process checks

@pytest.fixture
def job(monkeypatch):
    """The job's main() in this process (fast): 2 layers, 2 epochs; the thread count is restored after."""
    sys.path.insert(0, str(JOB.parent))
    import _finetune_job

    threads = torch.get_num_threads()

    def run(run_dir: Path, out: Path, *extra: str) -> None:
        _finetune_job.main(["--run-dir", str(run_dir), "--out", str(out), "--layers", "2", "--epochs", "2",
                            "--batches", "4", "--width", "32", *extra])

    yield run
    torch.set_num_threads(threads)
    sys.path.remove(str(JOB.parent))


@pytest.mark.parametrize("extra,field", [
    (("--epochs", "3"), "finetune"),
    (("--mode", "lora_only"), "finetune"),
    (("--batches", "5"), "calibration"),
    (("--seed", "1"), "finetune"),
    (("--width", "48"), "weights"),
])
def test_run_dir_of_another_run_is_refused(tmp_path, job, extra, field):
    job(tmp_path / "run", tmp_path / "a")
    with pytest.raises(ValueError, match=rf"holds a different run \(differs in \[.*'{field}'.*\]\)"):
        job(tmp_path / "run", tmp_path / "b", *extra)
    assert not (tmp_path / "b").exists()


def test_corrupt_checkpoint_is_never_loaded(tmp_path, job):
    """A checkpoint that is not whole (only possible if something other than the atomic writer put it
    there) is refused with its name; a temporary left by a writer killed mid-write is removed, not read."""
    run_dir = tmp_path / "run"
    job(run_dir, tmp_path / "a")
    ck = run_dir / "layers" / "encoder.layer.0.safetensors"
    whole = ck.read_bytes()
    ck.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="encoder.layer.0.safetensors is unreadable"):
        job(run_dir, tmp_path / "b")
    ck.write_bytes(whole)
    stale = run_dir / "layers" / ".tmp-encoder.layer.1.safetensors.x1y2"
    stale.write_bytes(whole[:100])
    (run_dir / "activations").mkdir()
    stale_capture = run_dir / "activations" / ".encoder.layer.1.0.safetensors.tmp"  # a capture killed mid-write
    stale_capture.write_bytes(whole[:100])
    job(run_dir, tmp_path / "c", "--storage", "disk")  # storage is not part of the run: disk trains identically
    assert not stale.exists() and not stale_capture.exists()
    assert_identical(tmp_path / "a", tmp_path / "c")


def test_interrupted_checkpoint_write_leaves_nothing(tmp_path, job, monkeypatch):
    """The rename is the commit: interrupted before it, neither the checkpoint nor its temporary remains."""
    import os

    from adaptwin.finetune import layerwise

    replace = os.replace

    def interrupted(src, dst):
        if str(dst).endswith(".safetensors") and "layers" in str(dst):
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(layerwise.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        job(tmp_path / "run", tmp_path / "a")
    monkeypatch.setattr(layerwise.os, "replace", replace)
    assert (tmp_path / "run" / "run.json").exists()
    assert list((tmp_path / "run" / "layers").iterdir()) == []
