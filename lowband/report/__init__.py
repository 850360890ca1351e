"""Turn finished run folders into one comparison report: a table, three loss plots, run details.

    from lowband.report import write_report
    write_report(["runs/ddp", "runs/diloco"], "reports/ddp-vs-diloco")  # -> .../index.html

Files: runs.py reads a run folder into arrays, plots.py draws the PNGs, html.py writes the page.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from lowband.errors import LowbandError
from lowband.report.html import format_bytes, format_count, format_seconds, render_html
from lowband.report.plots import AXES, plot_participants, write_plots
from lowband.report.runs import RunData, load_run, unique_labels

__all__ = [
    "RunData",
    "format_bytes",
    "format_count",
    "format_seconds",
    "load_run",
    "write_report",
]


def write_report(
    run_paths: list[Path | str], out_dir: Path | str, title: str | None = None
) -> Path:
    """Write index.html (self-contained) and the three PNGs into `out_dir`; returns index.html.

    Raises LowbandError if no run is given or any path is not a readable run folder.
    """
    paths = [Path(p) for p in run_paths]
    if not paths:
        raise LowbandError("no run folders given to report on")
    runs = [load_run(p, label) for p, label in zip(paths, unique_labels(paths))]
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only, below a file: one line, not a traceback
        from lowband.errors import RunDirError

        raise RunDirError(f"cannot create the report folder {out_dir}: {e.strerror or e}") from None

    pngs = write_plots(runs, out_dir)
    images = {pngs[key].name: (AXES[key].title, pngs[key].read_bytes()) for key in AXES}
    participants = plot_participants(runs, out_dir / "participants.png")
    if participants is not None:  # elastic runs: who took part in each synchronisation
        images[participants.name] = ("Participants per synchronisation", participants.read_bytes())
    if title is None:
        title = (
            "lowband: " + " vs ".join(r.label for r in runs[:4]) + (" ..." if len(runs) > 4 else "")
        )
    page = render_html(runs, images, title, datetime.now().astimezone())
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
