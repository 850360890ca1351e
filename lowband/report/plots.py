"""The three comparison plots: loss against tokens, wall-clock time and bytes sent per worker.

Each run gets one colour in every plot. Eval loss is drawn as markers joined by a line; train loss
as a thin, lighter line of the same colour, smoothed with an EMA so a noisy run stays readable.
Matplotlib is used through `Figure` directly (Agg canvas, no pyplot), so nothing here needs a
display or touches global pyplot state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lowband.report.runs import RunData

DPI = 120
FIGSIZE = (8.0, 5.0)  # inches: 960 x 600 px at DPI
MAX_TRAIN_POINTS = 2000


@dataclass(frozen=True)
class _Axis:
    file: str
    title: str
    train_x: Callable[[RunData], np.ndarray]
    eval_x: Callable[[RunData], np.ndarray]
    log: bool = False


AXES: dict[str, _Axis] = {
    "tokens": _Axis(
        "loss_vs_tokens.png",
        "Loss vs tokens processed",
        lambda r: r.tokens,
        lambda r: r.eval_tokens,
    ),
    "wall": _Axis(
        "loss_vs_wall.png",
        "Loss vs wall-clock time",
        lambda r: r.wall_time,
        lambda r: r.eval_wall_time,
    ),
    "bytes": _Axis(
        "loss_vs_bytes.png",
        "Loss vs data sent per worker",
        lambda r: r.bytes_sent,
        lambda r: r.eval_bytes_sent,
        log=True,
    ),
}


def run_colours(n: int) -> list[tuple[float, float, float]]:
    """`n` distinct colours, the same run getting the same colour in every plot."""
    base = list(matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors)
    return [base[i % len(base)] for i in range(n)]


def ema(values: np.ndarray, weight: float | None = None) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing) that skips non-finite values.

    Debiasing keeps the first points at the data instead of pulling them toward 0. A NaN or inf
    stays a gap in the output rather than poisoning every later point. With `weight=None` the
    weight grows with the series length so ~1% of the points make one time constant.
    """
    values = np.asarray(values, dtype=np.float64)
    if weight is None:
        weight = float(np.clip(1.0 - 100.0 / max(len(values), 1), 0.0, 0.98))
    out = np.full_like(values, np.nan)
    acc = norm = 0.0
    for i, v in enumerate(values):
        if math.isfinite(v):
            acc = weight * acc + (1.0 - weight) * v
            norm = weight * norm + (1.0 - weight)
            out[i] = acc / norm
    return out


def write_plots(runs: Sequence[RunData], out_dir: Path) -> dict[str, Path]:
    """Write the three PNGs into `out_dir`; returns {"tokens"|"wall"|"bytes": path}."""
    colours = run_colours(len(runs))
    return {key: plot_loss(runs, key, out_dir / axis.file, colours) for key, axis in AXES.items()}


def plot_loss(
    runs: Sequence[RunData],
    x: str,
    out: Path,
    colours: Sequence[tuple[float, float, float]] | None = None,
) -> Path:
    """Plot every run's loss against `x` ("tokens", "wall" or "bytes") into the PNG `out`."""
    axis = AXES[x]
    colours = colours if colours is not None else run_colours(len(runs))
    scale, unit = _x_scale(x, runs, axis)
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()

    handles, plotted_y, first_eval_x = [], [], []
    for run, colour in zip(runs, colours):
        tx, ty = _finite_x(axis.train_x(run), ema(run.train_loss), axis.log)
        # After smoothing, ~2000 points are more than the 960 px width can show; fewer points
        # keep the PNG small and legend placement ("best") fast on long runs.
        stride = max(1, len(tx) // MAX_TRAIN_POINTS)
        tx, ty = tx[::stride], ty[::stride]
        ex, ey = _finite_x(axis.eval_x(run), run.eval_loss, axis.log)
        ax.plot(tx / scale, ty, color=colour, lw=1.0, alpha=0.45, zorder=2)
        marker_size = 5 if len(ex) <= 40 else 3
        ax.plot(ex / scale, ey, "o-", color=colour, lw=1.8, ms=marker_size, zorder=3)
        plotted_y += [ty, ey]
        if ex.size:
            first_eval_x.append(ex[0] / scale)
        label = run.label + _label_note(run, tx.size + ex.size > 0, axis.log)
        if _diverged(run) and np.isfinite(ey).any():
            last = np.flatnonzero(np.isfinite(ey))[-1]
            ax.plot(ex[last] / scale, ey[last], "X", color=colour, ms=11, mec="black", zorder=4)
        handles.append(Line2D([], [], color=colour, marker="o", lw=1.8, ms=5, label=label))

    ax.set_title(axis.title, fontsize=13, fontweight="bold")
    ax.set_xlabel(unit)
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.grid(True, which="major", alpha=0.35)
    if axis.log:
        ax.set_xscale("log")
        if first_eval_x:
            # Start a little left of the first evaluation: a few setup bytes (an 8-byte digest per
            # worker before the first sync) would otherwise stretch the axis over many decades.
            ax.set_xlim(left=0.3 * min(first_eval_x))
        ax.grid(True, which="minor", alpha=0.12)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_plain_number))
        ax.xaxis.set_minor_formatter(
            ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5))
        )
    elif x == "tokens":
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_si_count))
    _set_ylim(ax, plotted_y)

    # One legend; its last two entries explain the line styles.
    handles += [
        Line2D([], [], ls="none", label=" "),
        Line2D([], [], color="0.3", marker="o", lw=1.8, ms=5, label="eval loss"),
        Line2D([], [], color="0.3", lw=1.0, alpha=0.45, label="train loss (EMA)"),
    ]
    if len(runs) <= 6:
        ax.legend(handles=handles, loc="best", fontsize=9)
    else:  # too many entries to sit on the data: put the legend beside the plot
        fig.set_size_inches(FIGSIZE[0] + 2.5, FIGSIZE[1])
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out


def _diverged(run: RunData) -> bool:
    """The run's last logged loss (eval, else train) is NaN or inf."""
    last = run.eval_loss if run.eval_loss.size else run.train_loss
    return bool(last.size) and not math.isfinite(float(last[-1]))


def _label_note(run: RunData, plotted: bool, log: bool) -> str:
    if not plotted:
        return (
            " (sent no bytes)" if log and not np.nanmax(run.bytes_sent, initial=0) else " (no data)"
        )
    if _diverged(run):
        return " (diverged: X)"
    return "" if run.complete else " (incomplete)"


def _finite_x(x: np.ndarray, y: np.ndarray, log: bool) -> tuple[np.ndarray, np.ndarray]:
    # Drop points without an x (and x <= 0 on a log axis, e.g. step 0 before any byte was sent);
    # non-finite y stay in as NaN so matplotlib draws a gap where a run diverged.
    keep = np.isfinite(x) & (x > 0 if log else True)
    y = np.where(np.isfinite(y), y, np.nan)
    return x[keep], y[keep]


def _x_scale(x: str, runs: Sequence[RunData], axis: _Axis) -> tuple[float, str]:
    """Divisor and axis label for `x`, the unit picked from the largest value of any run."""
    biggest = max((float(np.nanmax(axis.train_x(r), initial=0.0)) for r in runs), default=0.0)
    if x == "wall":
        if biggest >= 2 * 3600:
            return 3600.0, "wall-clock time (hours)"
        if biggest >= 2 * 60:
            return 60.0, "wall-clock time (minutes)"
        return 1.0, "wall-clock time (seconds)"
    if x == "bytes":
        for divisor, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
            if biggest >= divisor:
                return divisor, f"data sent per worker ({name}, log scale)"
        return 1.0, "data sent per worker (bytes, log scale)"
    return 1.0, "tokens processed (all workers)"


def _set_ylim(ax, ys: list[np.ndarray]) -> None:
    # Loss falls fast at first: cap the top at the 98th percentile so the first few points don't
    # squash the differences between runs near the end, which is what the comparison is about.
    finite = np.concatenate([y[np.isfinite(y)] for y in ys]) if ys else np.array([])
    if finite.size < 2:
        return
    lo, hi = float(finite.min()), float(np.percentile(finite, 98))
    if hi <= lo:
        return
    pad = 0.05 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)


def _si_count(value: float, _pos: int | None = None) -> str:
    for divisor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= divisor:
            return f"{value / divisor:g}{suffix}"
    return f"{value:g}"


def _plain_number(value: float, _pos: int | None = None) -> str:
    return f"{value:g}"


def plot_participants(
    runs: Sequence[RunData],
    out: Path,
    colours: Sequence[tuple[float, float, float]] | None = None,
) -> Path | None:
    """Participants of every synchronisation against the step, for the elastic runs among `runs`,
    with each recovery (a worker healed from a live peer) marked. None if no run is elastic."""
    colours = colours if colours is not None else run_colours(len(runs))
    elastic = [(r, c, r.elastic()) for r, c in zip(runs, colours)]
    elastic = [(r, c, e) for r, c, e in elastic if e is not None and e["participants"]]
    if not elastic:
        return None
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * 0.6), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for run, colour, e in elastic:
        steps = [s for s, _ in e["participants"]]
        counts = [n for _, n in e["participants"]]
        last = int(run.steps[-1]) if run.steps.size else steps[-1]
        ax.step([*steps, last], [*counts, counts[-1]], where="post", color=colour, lw=2,
                label=f"{run.label}: {e['failures']} failures, {e['recoveries']} recoveries")  # fmt: skip
        healed = sorted({ev["step"] for ev in run.events if ev["event"] == "recovered"})
        at = dict(e["participants"])
        ax.plot(healed, [at.get(s, counts[-1]) for s in healed], "v", color=colour, ms=9,
                mec="black", zorder=3)  # fmt: skip
    ax.set_title("Workers in each synchronisation (v = a worker recovered from a live peer)",
                 fontsize=12, fontweight="bold")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("participants")
    top = max(n for _, _, e in elastic for _, n in e["participants"])
    ax.set_ylim(0, top + 0.7)
    ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(True, alpha=0.35)
    ax.legend(loc="lower left", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out


def graph_png(run: RunData) -> bytes | None:
    """A decentralized run's graph (its `topology` event), nodes on a circle, each edge as wide as
    the bytes it carried (both directions, from the workers' `edge_bytes` events) and labelled in
    MB. None for a run without a graph."""
    import io

    topo = next((e for e in run.events if e.get("event") == "topology"), None)
    if topo is None or not isinstance(topo.get("nodes"), int):
        return None
    n = topo["nodes"]
    carried: dict[tuple[int, int], float] = {}
    for e in run.events:
        if e.get("event") == "edge_bytes" and isinstance(e.get("sent_to"), dict):
            for dst, b in e["sent_to"].items():
                key = (min(int(e["rank"]), int(dst)), max(int(e["rank"]), int(dst)))
                carried[key] = carried.get(key, 0.0) + float(b)
    edges = {(min(a, b), max(a, b)) for a, b in topo.get("edges", [])}
    angle = [2 * math.pi * i / max(n, 1) for i in range(n)]
    xy = [(math.cos(a), math.sin(a)) for a in angle]
    fig = Figure(figsize=(FIGSIZE[1], FIGSIZE[1]), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    top = max(carried.values(), default=0.0) or 1.0
    for a, b in sorted(edges):
        (x0, y0), (x1, y1) = xy[a], xy[b]
        mb = carried.get((a, b), 0.0)
        ax.plot([x0, x1], [y0, y1], color="#4477aa", lw=0.5 + 5.0 * mb / top, zorder=1)
        if n <= 16 and mb:
            ax.annotate(f"{mb / 1e6:.1f}", ((x0 + x1) / 2, (y0 + y1) / 2), fontsize=7,
                        ha="center", va="center", color="#333333", zorder=3,
                        bbox={"boxstyle": "round", "fc": "white", "ec": "none"})  # fmt: skip
    ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=260, color="#ee7733", zorder=2)
    for i, (x, y) in enumerate(xy):
        ax.annotate(str(i), (x, y), ha="center", va="center", fontsize=9, zorder=3)
    gap = topo.get("spectral_gap")
    ax.set_title(f"{topo.get('topology')}, {n} nodes, spectral gap {gap:.3g}: MB per edge"
                 if isinstance(gap, float) else str(topo.get("topology")), fontsize=9)  # fmt: skip
    ax.set_aspect("equal")
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()
