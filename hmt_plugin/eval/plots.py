"""PNG plots of an evaluation: PPL against context length, recall-distance histogram."""

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from hmt_plugin.eval.long_context import LongContextResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_context(results: Sequence[LongContextResult], path: Path) -> Optional[Path]:
    """One line per run: last-segment PPL (log scale) against T (log scale), with peak memory
    against T below it. Returns the path, or None when nothing was scored."""
    scored = [r for r in results if any(s.tokens for s in r.context)]
    if not scored:
        return None
    plt = _pyplot()
    has_memory = any(s.peak_memory_mb is not None for r in scored for s in r.context)
    rows = 2 if has_memory else 1
    fig, axes = plt.subplots(rows, 1, figsize=(6.4, 3.6 * rows), squeeze=False)
    ax = axes[0][0]
    for r in scored:
        points = [(s.context_length, s.ppl) for s in r.context if s.tokens]
        ax.plot(*zip(*points), marker="o", label=r.label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context length T (tokens)")
    ax.set_ylabel("PPL of the last segment")
    ax.set_title("Perplexity after T tokens of context")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if has_memory:
        ax = axes[1][0]
        for r in scored:
            points = [
                (s.context_length, s.peak_memory_mb)
                for s in r.context
                if s.peak_memory_mb is not None
            ]
            if points:
                ax.plot(*zip(*points), marker="o", label=r.label)
        ax.set_xscale("log")
        ax.set_xlabel("context length T (tokens)")
        ax.set_ylabel(f"peak memory (MB, {scored[0].memory_probe})")
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_recall_distance(results: Sequence[LongContextResult], path: Path) -> Optional[Path]:
    """Histogram of how many segments back each segment's strongest recall looks (the
    paper's Figure 11), one series per ``hmt`` run. Returns the path, or None without any
    recall."""
    return plot_recall_histogram({r.label: r.recall_distance for r in results}, path)


def plot_recall_histogram(series: Mapping[str, Mapping[Any, int]], path: Path) -> Optional[Path]:
    """The recall-distance histogram from ``{label: {segments back: count}}`` (keys may be
    strings, as read back from JSON; ``-1``, nothing recalled, is left out). Returns the
    path, or None when no series has a recall."""
    counts = {
        label: {int(k): v for k, v in c.items() if int(k) >= 0} for label, c in series.items()
    }
    counts = {label: c for label, c in counts.items() if c}
    if not counts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(counts)
    for i, (label, c) in enumerate(counts.items()):
        total = sum(c.values())
        xs = sorted(c)
        ax.bar(
            [x + (i - (len(counts) - 1) / 2) * width for x in xs],
            [c[x] / total for x in xs],
            width=width,
            label=f"{label} ({total} segments)",
        )
    ax.set_xlabel("segments back of the strongest recall")
    ax.set_ylabel("fraction of segments")
    ax.set_title("Recall distance")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_styles(n: int) -> List[Dict[str, Any]]:
    """``n`` line styles that differ pairwise: matplotlib's default cycle has 10 colours, so
    an 11th line would repeat the first's. Past 10 lines the 20 colours of ``tab20``; past
    those, markers change with each round of colours."""
    from matplotlib import colormaps

    colours = colormaps["tab10" if n <= 10 else "tab20"].colors
    markers = "osD^vP"
    return [{"color": colours[i % len(colours)], "marker": markers[(i // len(colours)) % len(markers)]}
            for i in range(n)]


def plot_band_ppl(series: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> Optional[Path]:
    """PPL by position band, one line per reader, with one-standard-error bars; the legend
    sits beside the axes, not on the data. ``series`` maps a label to band scores
    (:class:`~hmt_plugin.eval.token_nll.BandScore` as dicts: ``end``, ``ppl``, ``ppl_low``,
    ``ppl_high``). Returns the path, or None when there is nothing to draw."""
    series = {label: bands for label, bands in series.items() if bands}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 4.2))
    for (label, bands), style in zip(series.items(), line_styles(len(series))):
        xs = [b["end"] for b in bands]
        ys = [b["ppl"] for b in bands]
        err = [[b["ppl"] - b["ppl_low"] for b in bands], [b["ppl_high"] - b["ppl"] for b in bands]]
        ax.errorbar(xs, ys, yerr=err, capsize=3, label=label, **style)
    ax.set_xscale("log")
    ax.set_xlabel("end of the position band T (tokens read before it: the previous band end)")
    ax.set_ylabel("PPL of the band")
    ax.set_title("Perplexity by position in held-out pieces")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
