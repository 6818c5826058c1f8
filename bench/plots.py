"""The report's pictures (PNG, drawn with matplotlib from the optional ``bench`` extra).

* latency percentiles (p50, p90, p99) against offered load, one line per server,
  from the open-loop sweeps (bench/open_loop.py);
* view build time and resident memory against instance count (bench/view_scale.py).

``pip install -e '.[bench]'`` installs matplotlib; without it the report says
the pictures were not drawn and keeps its tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.open_loop import Sweep

PERCENTILES = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"))


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _footer(figure, note: str) -> None:  # type: ignore[no-untyped-def]
    """Which run drew the picture (command, time, load): a picture from a busy machine says so itself."""
    if note:
        figure.text(0.005, 0.005, note, fontsize=8, color="dimgrey")
        figure.subplots_adjust(bottom=0.16)


def latency_plot(sweeps: Sequence[Sweep], path: Path, title: str, unit: str, note: str = "") -> Path:
    """p50/p90/p99 latency against offered rate for each server; points the generator could not offer are left out."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    for ax, (key, label) in zip(axes, PERCENTILES):
        for sweep in sweeps:
            points = [p for p in sweep.points if not p.generator_limited]
            if not points:
                continue
            line, = ax.plot([p.offered for p in points], [max(getattr(p, key), 1e-3) for p in points], marker="o",
                            label=sweep.server)
            saturated = [p for p in points if p.saturated]
            if saturated:
                ax.plot([p.offered for p in saturated], [max(getattr(p, key), 1e-3) for p in saturated], marker="x",
                        markersize=11, linestyle="none", color=line.get_color())
        ax.set_title(f"{label} latency")
        ax.set_xlabel(f"offered load ({unit})")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (ms, from the scheduled send time)")
    axes[0].legend(loc="upper left")
    figure.suptitle(f"{title} (x: saturated - answers below 95% of the offered rate or timeouts)")
    figure.tight_layout()
    _footer(figure, note)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def scale_plot(rows: Sequence[Mapping[str, float]], path: Path, note: str = "") -> Path:
    """View build time (first load, a swap with every instance changed, 1% changed) and resident memory
    against instance count, from bench/view_scale.py's JSON rows."""
    plt = _pyplot()
    from matplotlib import ticker

    sizes = [row["instances"] for row in rows]
    figure, (build, memory) = plt.subplots(1, 2, figsize=(12, 4.8))
    build.plot(sizes, [row["first_build_median_s"] for row in rows], marker="o", label="first load")
    build.plot(sizes, [row["swap_all_build_s"] for row in rows], marker="o", label="swap, all changed")
    build.plot(sizes, [row["swap_1pct_build_median_s"] for row in rows], marker="o", label="swap, 1% changed")
    build.plot([100_000], [2.0], color="grey", marker="*", markersize=12, linestyle="none",
               label="target: 100k instances in 2 s")
    build.set_xscale("log")
    build.set_yscale("log")
    build.set_xlabel("instances")
    build.set_ylabel("build time (s)")
    build.set_title("view build time")
    build.legend()
    build.grid(True, which="both", alpha=0.3)
    memory.plot(sizes, [row["resident_first_mb"] for row in rows], marker="o", label="after first load")
    memory.plot(sizes, [row["resident_mb"] for row in rows], marker="o", label="after swaps")
    memory.plot(sizes, [size * 8 / 1024 for size in sizes], color="grey", linestyle="--",
                label="target: 8 KB per instance")
    memory.set_xscale("log")
    memory.set_yscale("log")
    memory.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    memory.yaxis.set_minor_formatter(ticker.NullFormatter())
    memory.set_xlabel("instances")
    memory.set_ylabel("resident memory (MB)")
    memory.set_title("view memory")
    memory.legend()
    memory.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    _footer(figure, note)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
