"""Timing and reporting helpers shared by the benchmark scripts.

Timings are wall-clock medians with p20/p80 over repeats. Providers are timed *interleaved* (one call of
each per round, start rotating): on a shared machine the load of other processes then falls on every
provider alike, and the ratios stay meaningful even when the absolute times drift. The CPU time other
processes took during the run is measured from /proc/stat and written beside the timings, so a reader
can tell a quiet run from a contended one.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from adaptwin._files import give_default_mode, remove_dead_temps, temp_prefix

# One header for every benchmark's CSV; a benchmark leaves the fields it has no use for empty.
CSV_FIELDS = (
    "benchmark", "shape", "dtype", "provider",
    "p20_ms", "p50_ms", "p80_ms", "repeats", "ratio_p50",
    "gflop", "gflop_ratio", "rel_err", "weight_mb",
    "device", "threads", "other_load", "torch", "transformers", "adaptwin", "timestamp",
)
# Rows with the same values here are the same measurement: a new run replaces them in the CSV.
ROW_KEY = ("benchmark", "shape", "dtype", "provider", "device", "threads")


@dataclass
class Timing:
    """Wall-clock samples of one provider, in seconds."""

    samples: list[float] = field(default_factory=list)

    def quantile_ms(self, q: float) -> float:
        """Linear-interpolated quantile ``q`` in [0, 1], in milliseconds."""
        if not self.samples:
            raise ValueError("no samples were taken")
        s = sorted(self.samples)
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return 1e3 * (s[lo] + (s[hi] - s[lo]) * (pos - lo))

    @property
    def p20(self) -> float:
        return self.quantile_ms(0.2)

    @property
    def p50(self) -> float:
        return self.quantile_ms(0.5)

    @property
    def p80(self) -> float:
        return self.quantile_ms(0.8)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 2
) -> dict[str, Timing]:
    """Time each callable ``repeats`` times, one call of each per round.

    Every provider is first called ``warmup`` times (allocator, oneDNN primitive caches, lazy init). The
    order within a round rotates, so no provider always runs right after the same neighbour.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    out = {name: Timing() for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            out[name].samples.append(time.perf_counter() - t0)
    return out


FP32_ONLY = ("dense_int8",)  # providers without 16-bit rows: torch's dynamic int8 linear takes float32 only


def runs_in(provider: str, dtype: str) -> bool:
    """Whether a benchmark row exists for ``provider`` in ``dtype`` ("fp32", "bf16", ...)."""
    return dtype == "fp32" or provider not in FP32_ONLY


def int8_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by torch's dynamically quantised int8 linear
    (``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``, as PyTorch's dynamic
    quantisation tutorial applies it to BERT: int8 weights with one scale per matrix, activations quantised on
    each call, fbgemm / oneDNN int8 GEMMs): the stock CPU peer of the compressed models. It takes float32
    activations only (a caller runs it in its fp32 rows)."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as err:  # announced for removal in a later torch
        raise RuntimeError(f"torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic ({err}); "
                           "leave the int8 peer out of --providers") from err
    import copy

    with warnings.catch_warnings():  # its per-tensor quantised weights are deprecated, not yet removed
        warnings.simplefilter("ignore")
        if isinstance(model, torch.nn.Linear):  # quantize_dynamic swaps submodules, never the root
            return quantize_dynamic(torch.nn.Sequential(copy.deepcopy(model)), {torch.nn.Linear}, dtype=torch.qint8)[0]
        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor in ``module``'s state dict (parameters, buffers, the packed weights of quantised
    modules), a tensor shared by several entries (tied embeddings) counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(value: object) -> None:
        nonlocal total
        if isinstance(value, (tuple, list)):
            for v in value:
                add(v)
            return
        if not isinstance(value, torch.Tensor) or value.device.type == "meta":
            return
        size = value.numel() * value.element_size()
        if value.is_quantized and value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            size += sum(t.numel() * t.element_size()
                        for t in (value.q_per_channel_scales(), value.q_per_channel_zero_points()))
        key = (value.data_ptr(), size)
        if size and key not in seen:
            seen.add(key)
            total += size

    for v in module.state_dict(keep_vars=True).values():
        add(v)
    return total


def pick(ap: argparse.ArgumentParser, text: str, allowed: Iterable[str], what: str) -> list[str]:
    """The comma-separated names in ``text``, each one of ``allowed``; ``ap.error`` (exit 2) names the rest."""
    allowed = list(allowed)
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        ap.error(f"unknown {what} {bad}; allowed: {sorted(allowed)}")
    return items


def keep_heap() -> None:
    """Make glibc keep freed memory (no heap trimming; blocks up to 32 MiB from the heap, not fresh mmaps).

    With glibc's defaults a large tensor (a Whisper-tiny FFN activation is 9.2 MB) is page-faulted afresh
    on some calls and not on others, depending on what ran and was freed before: 14-19 thousand faults
    per dense tiny encoder forward, 25-35 ms of its time, varying with the order of the providers. Process-
    wide; glibc (Linux) only.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as err:
        raise RuntimeError(f"keeping the heap needs glibc (libc.so.6): {err}") from None
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise RuntimeError("glibc's mallopt refused M_MMAP_THRESHOLD / M_TRIM_THRESHOLD")


class OtherLoad:
    """Average number of cores busy with *other* processes between `start` and `stop` (Linux only).

    Total busy jiffies from /proc/stat minus this process's CPU time; None where /proc/stat is missing.
    """

    def __init__(self) -> None:
        self._t0: tuple[float, float, float] | None = None
        self.value: float | None = None

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        ticks = [int(x) for x in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")

    def start(self) -> OtherLoad:
        busy = self._busy_seconds()
        self._t0 = None if busy is None else (busy, time.process_time(), time.perf_counter())
        return self

    def stop(self) -> float | None:
        busy = self._busy_seconds()
        if self._t0 is None or busy is None:
            return None
        busy0, own0, wall0 = self._t0
        wall = time.perf_counter() - wall0
        other = (busy - busy0) - (time.process_time() - own0)
        self.value = max(0.0, other / wall) if wall > 0 else None
        return self.value


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_string(device: str = "cpu") -> str:
    """E.g. ``cpu: AMD EPYC (2 threads of 2 cores, torch AVX512, adaptwin avx512_bf16)``: the SIMD level torch's
    kernels run at (``ATEN_CPU_CAPABILITY`` lowers it) and the highest path adaptwin's CPU kernels take
    (``ADAPTWIN_CPU_CAP`` lowers it; "reference" without the native library)."""
    if device == "cpu":
        from adaptwin.ops.backends import cpu_features, load

        torch_cap = torch.backends.cpu.get_cpu_capability()
        paths = cpu_features()
        ours = next((name for name in ("avx512_bf16", "avx512", "avx2", "neon") if paths.get(name)),
                    "portable" if load()["cpp"] else "reference")
        return (f"cpu: {cpu_name()} ({torch.get_num_threads()} threads of {os.cpu_count()} cores, "
                f"torch {torch_cap}, adaptwin {ours})")
    return f"{device}: {torch.cuda.get_device_name()}" if device.startswith("cuda") else device


def versions() -> dict[str, str]:
    import transformers

    import adaptwin

    return {"torch": torch.__version__, "transformers": transformers.__version__, "adaptwin": adaptwin.__version__}


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_rows(path: str | os.PathLike[str], rows: Iterable[Mapping[str, object]], *,
               fields: Sequence[str] = CSV_FIELDS, key: Sequence[str] = ROW_KEY) -> Path:
    """Merge ``rows`` into the CSV at ``path`` atomically (temp file + rename in the same folder).

    Existing rows with the same ``key`` fields are replaced, others kept; a file with a different header is
    replaced whole. Floats are written with 6 significant digits. ``fields``/``key`` default to the timing
    benchmarks' `CSV_FIELDS`/`ROW_KEY`; a benchmark that measures something else passes its own.
    """
    fields, key = tuple(fields), tuple(key)
    if not set(key) <= set(fields):
        raise ValueError(f"key fields {sorted(set(key) - set(fields))} are not among the CSV fields {list(fields)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    unknown = {k for r in rows for k in r} - set(fields)
    if unknown:
        raise ValueError(f"unknown CSV fields {sorted(unknown)}; allowed: {list(fields)}")
    new = [{k: _fmt(r.get(k, "")) for k in fields} for r in rows]
    keys = {tuple(r[k] for k in key) for r in new}
    old: list[dict[str, str]] = []
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) == fields:
                old = [r for r in reader if tuple(r[k] for k in key) not in keys]
    remove_dead_temps(path.parent, path.name)  # what a write killed mid-way left
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(old + new)
        give_default_mode(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain fixed-width table (right-aligned numbers, left-aligned text)."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if j and _numeric(c) else c.ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
    except ValueError:
        return False
    return True


def save_figure(fig, out: str | os.PathLike[str]) -> Path:
    """Write a matplotlib figure as PNG atomically (temp file + rename in the same folder), then close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out
