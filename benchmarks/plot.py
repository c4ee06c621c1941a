"""PNG from a benchmark CSV: median time per provider (p20-p80 whiskers), grouped by shape and dtype.

    python -m benchmarks.plot [results/whisper_encoder_speed.csv] [--out results/whisper_encoder_speed.png]
                              [--benchmark whisper_encoder_speed]

Needs matplotlib; without it the script says so and exits with status 0 (plots are optional).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path


def load_rows(path: str | Path, benchmark: str | None = None) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if benchmark is None or r["benchmark"] == benchmark]


def short_shapes(shapes: list[str]) -> dict[str, str]:
    """Each shape label cut to its fewest leading ':'-separated parts that still tell the shapes apart
    ("tiny:d384:..." -> "tiny"; "M1500:384x384:r96" and "M1500:384x1536:r154" keep two parts)."""
    unique = list(dict.fromkeys(shapes))
    parts = {s: s.split(":") for s in unique}
    for depth in range(1, max((len(v) for v in parts.values()), default=1) + 1):
        cut = {s: ":".join(v[:depth]) for s, v in parts.items()}
        if len(set(cut.values())) == len(unique):
            return cut
    return {s: s for s in unique}


def plot(rows: list[dict[str, str]], out: str | Path, title: str = "") -> Path:
    """Bar chart of p50 per (shape, dtype) group and provider; bars labelled with the ratio to dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
    short = short_shapes([r["shape"] for r in rows])
    for r in rows:
        groups[f"{short[r['shape']]}\n{r['dtype']}"][r["provider"]] = r
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(groups), 4.2))
    for i, p in enumerate(providers):
        xs, p50, lo, hi, labels = [], [], [], [], []
        for g, by in enumerate(groups.values()):
            if p not in by:
                continue
            r = by[p]
            xs.append(g + (i - (len(providers) - 1) / 2) * width)
            p50.append(float(r["p50_ms"]))
            lo.append(float(r["p50_ms"]) - float(r["p20_ms"]))
            hi.append(float(r["p80_ms"]) - float(r["p50_ms"]))
            labels.append(f"{float(r['ratio_p50']):.2f}x" if r.get("ratio_p50") else "")
        bars = ax.bar(xs, p50, width, yerr=[lo, hi], capsize=3, label=p)
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel("median ms per forward (whiskers p20-p80)")
    ax.set_yscale("log")
    loads = [float(r["other_load"]) for r in rows if r.get("other_load")]
    device = rows[0]["device"] if rows else ""
    note = f"{device}; other processes busy {max(loads):.2f} cores at most" if loads else device
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="?", default="results/whisper_encoder_speed.csv")
    ap.add_argument("--out", default=None, help="PNG path (default: the CSV's path with .png)")
    ap.add_argument("--benchmark", default=None, help="only rows of this benchmark (default: all)")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("benchmarks.plot: matplotlib is not installed (pip install matplotlib); no plot made.")
        return 0
    rows = load_rows(args.csv, args.benchmark)
    if not rows:
        print(f"benchmarks.plot: no rows in {args.csv}" + (f" for {args.benchmark}" if args.benchmark else ""))
        return 1
    out = plot(rows, args.out or Path(args.csv).with_suffix(".png"), title=args.benchmark or rows[0]["benchmark"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
