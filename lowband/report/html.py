"""A self-contained index.html: inline CSS, PNGs as base64 data URIs, no external assets.

Every string that comes from a run folder (labels, config values, hostnames...) goes through
`html.escape`, since run folders can be shared between people.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from matplotlib.colors import to_hex

from lowband.comm.accounting import format_bytes
from lowband.report.plots import run_colours
from lowband.report.runs import RunData

__all__ = ["format_bytes", "format_count", "format_loss", "format_seconds", "render_html"]


def format_seconds(s: float | None) -> str:
    """A duration: '850 ms', '12.3 s', '4 min 05 s', '2 h 03 min'."""
    if s is None or not math.isfinite(s):
        return "–"
    if s < 1:
        return f"{_sig3(s * 1000)} ms" if s > 0 else "0 s"
    if s < 59.95:
        return f"{_sig3(s)} s"
    total = round(s)
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    minutes = round(s / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_count(n: float | None) -> str:
    """A count with K / M / B suffixes and 3 significant digits: 124M, 5.12K, 87."""
    if n is None or not math.isfinite(n):
        return "–"
    for divisor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= divisor * 0.9995:
            return f"{_sig3(n / divisor)}{suffix}"
    return f"{n:.3g}" if n != int(n) else f"{int(n)}"


def format_loss(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.4f}" if math.isfinite(x) else "NaN (diverged)"


def _sig3(x: float) -> str:
    # '#' keeps trailing zeros (1.00, 45.0), which then leaves a bare '.' on 3-digit values.
    return f"{x:#.3g}".rstrip(".")


def _esc(value: Any) -> str:
    return html.escape("–" if value is None or value == "" else str(value))


def render_html(
    runs: Sequence[RunData],
    images: Mapping[str, tuple[str, bytes]],
    title: str,
    generated: datetime,
) -> str:
    """The report page. `images` maps a PNG file name to (caption, png bytes), in display order."""
    colours = [to_hex(c) for c in run_colours(len(runs))]
    finals = [r.final() for r in runs]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="muted">Generated {_esc(generated.isoformat(timespec="seconds"))} '
        f"from {len(runs)} run{'s' if len(runs) != 1 else ''}.</p>",
        *_corpus_warning(runs),
        _table(runs, finals, colours),
        *_figures(images),
        "<h2>Run details</h2>",
        *(_details(r, c) for r, c in zip(runs, colours)),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _corpus_warning(runs: Sequence[RunData]) -> list[str]:
    hashes = {(r.meta.get("corpus") or {}).get("sha256") for r in runs} - {None}
    if len(hashes) <= 1:
        return []
    return [
        '<p class="warn">These runs trained on different corpora (different sha256): '
        "their losses are not directly comparable.</p>"
    ]


def _best_index(values: Sequence[float]) -> int | None:
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    return min(finite)[1] if len(values) > 1 and finite else None


def _robust_note(cfg: dict[str, Any]) -> str:
    """The aggregator, f and attack of a run (a loss under attack is not a clean loss)."""
    from lowband.algorithms.robust import robust_label

    label = robust_label(cfg)
    return f'<br><span class="muted">{_esc(label)}</span>' if label else ""


def _table(runs: Sequence[RunData], finals: list[dict[str, Any]], colours: list[str]) -> str:
    # A crashed run sent fewer bytes only because it stopped early: "best" is among complete runs
    # (when there are any). Eval losses compete only with eval losses, unless no run has one.
    eligible = [f["complete"] for f in finals] if any(f["complete"] for f in finals) else None
    has_eval = [f["loss_source"] in ("eval", "summary") for f in finals]
    loss_ok = has_eval if any(has_eval) else None

    def best(key: str, *masks: list[bool] | None) -> int | None:
        ok = [all(m is None or m[i] for m in masks) for i in range(len(finals))]
        return _best_index([f[key] if o else math.nan for f, o in zip(finals, ok)])

    best_loss = best("final_eval_loss", eligible, loss_ok)
    best_total = best("bytes_sent_total", eligible)
    best_per_worker = best("bytes_sent_per_worker", eligible)

    head = (
        "run", "algo", "workers", "link", "model", "final eval loss", "total bytes sent",
        "bytes sent / worker", "outer steps", "peak bytes / sync", "tokens/s", "compute util.",
        "exposed comm", "wall time", "status",
    )  # fmt: skip
    header = "".join(f"<th>{h}</th>" for h in head)
    rows = [f'<div class="scroll"><table><thead><tr>{header}</tr></thead><tbody>']
    for i, (run, fin, colour) in enumerate(zip(runs, finals, colours)):
        cfg = run.config
        params = run.meta.get("model_params")
        model = _esc(cfg.get("model"))
        if isinstance(params, int | float):
            model += f' <span class="muted">({format_count(params)} params)</span>'
        loss = _esc(format_loss(fin["final_eval_loss"]))
        if fin["loss_source"] == "train":
            loss += ' <span class="muted" title="this run logged no eval loss">(train)</span>'
        status = "complete" if fin["complete"] else "incomplete"
        note = " · diverged" if not math.isfinite(fin["final_eval_loss"]) else ""
        util = fin["compute_utilisation"]
        cells = [
            f'<td><span class="swatch" style="background:{colour}"></span>{_esc(run.label)}</td>',
            f"<td>{_esc(cfg.get('algo'))}{_robust_note(cfg)}</td>",
            f'<td class="num">{_esc(cfg.get("workers", fin["workers"]))}</td>',
            f"<td>{_esc(cfg.get('link'))}</td>",
            f"<td>{model}</td>",
            _num_cell(loss, i == best_loss),
            _num_cell(_esc(format_bytes(fin["bytes_sent_total"])), i == best_total),
            _num_cell(_esc(format_bytes(fin["bytes_sent_per_worker"])), i == best_per_worker),
            _num_cell(f"{fin['outer_steps']:.0f}" if math.isfinite(fin["outer_steps"]) else "–"),
            _num_cell(
                _esc(format_bytes(fin["peak_sync_bytes"]))
                if math.isfinite(fin["peak_sync_bytes"])
                else "–"
            ),
            _num_cell(_esc(format_count(fin["tokens_per_s"]))),
            _num_cell(f"{util * 100:.1f}%" if math.isfinite(util) else "–"),
            _num_cell(
                f"{fin['exposed_comm_fraction'] * 100:.1f}%"
                if math.isfinite(fin["exposed_comm_fraction"])
                else "–"
            ),
            _num_cell(_esc(format_seconds(fin["wall_time"]))),
            f'<td class="{status}">{status}{note}</td>',
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</tbody></table></div>")
    rows.append(
        '<p class="muted">Bold: the best final eval loss and the fewest bytes sent (among complete '
        "runs). "
        "Bytes are decimal (1 MB = 10<sup>6</sup> B). Compute utilisation = compute time / wall "
        "time, summed over workers; exposed comm = time blocked on communication / wall time "
        "(overlapped communication is not exposed). Peak bytes / sync: the most one worker sent "
        "in one outer synchronisation. Everything is computed from the metrics' last lines.</p>"
    )
    return "\n".join(rows)


def _num_cell(content: str, best: bool = False) -> str:
    if best:
        return f'<td class="num best"><strong>{content}</strong></td>'
    return f'<td class="num">{content}</td>'


def _figures(images: Mapping[str, tuple[str, bytes]]) -> list[str]:
    out = ["<h2>Loss curves</h2>"]
    for name, (caption, png) in images.items():
        data = base64.b64encode(png).decode("ascii")
        out.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)} <code>{_esc(name)}</code></figcaption></figure>"
        )
    return out


def _details(run: RunData, colour: str) -> str:
    meta, corpus = run.meta, run.meta.get("corpus") or {}
    sha, sharing = corpus.get("sha256"), meta.get("gpu_sharing")
    fields = [
        ("folder", run.path),
        ("status", "complete" if run.complete else "incomplete"),
        ("corpus", corpus.get("name")),
        ("corpus tokens", format_count(_as_float(corpus.get("num_tokens")))),
        ("corpus sha256", sha),
        ("device", meta.get("device")),
        *([("GPU sharing", sharing.get("note"))] if isinstance(sharing, dict) else []),
        ("world size", meta.get("world_size")),
        ("torch", meta.get("torch_version")),
        ("lowband", meta.get("lowband_version")),
        ("python", meta.get("python")),
        ("host", meta.get("hostname")),
        ("git commit", meta.get("git_commit")),
        ("started", meta.get("started")),
    ]
    out = [
        f'<section class="run"><h3><span class="swatch" style="background:{colour}"></span>'
        f"{_esc(run.label)}</h3><dl>",
        *(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in fields),
        "</dl>",
    ]
    if run.warnings:
        out.append('<ul class="warnings">')
        out += [f"<li>{_esc(w)}</li>" for w in run.warnings]
        out.append("</ul>")
    out += _elastic_details(run)
    out += _graph_details(run)
    out += _partition_details(run)
    by_op = (run.summary or {}).get("bytes_by_op")
    if isinstance(by_op, dict) and by_op:
        total = sum(v for v in by_op.values() if isinstance(v, int | float)) or 1
        out.append('<table class="ops"><thead><tr><th>op</th><th>bytes</th><th>share</th></tr>')
        out.append("</thead><tbody>")
        for op, n in sorted(by_op.items(), key=lambda kv: -_as_float(kv[1])):
            share = f"{_as_float(n) / total * 100:.1f}%"
            out.append(
                f'<tr><td>{_esc(op)}</td><td class="num">{_esc(format_bytes(_as_float(n)))}</td>'
                f'<td class="num">{share}</td></tr>'
            )
        out.append("</tbody></table>")
    config = html.escape(json.dumps(run.config, indent=2, sort_keys=True, default=str))
    out.append(f"<details><summary>config.json</summary><pre>{config}</pre></details></section>")
    return "\n".join(out)


def _partition_details(run: RunData) -> list[str]:
    """Each worker's share of the training data under --partition (partition.json), if written."""
    try:
        data = json.loads((Path(run.path) / "partition.json").read_text())
        workers = list(data["workers"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    out = [
        f'<table class="ops"><caption>--partition {_esc(data.get("partition"))}</caption>'
        "<thead><tr><th>worker</th><th>documents</th><th>tokens</th><th>share</th>"
        "<th>largest sources</th></tr></thead><tbody>"
    ]
    for w in workers:
        out.append(
            f'<tr><td>{_esc(w.get("worker"))}</td><td class="num">{_esc(w.get("documents"))}</td>'
            f'<td class="num">{_esc(format_count(_as_float(w.get("tokens"))))}</td>'
            f'<td class="num">{_as_float(w.get("share")) * 100:.1f}%</td>'
            f"<td>{_esc(', '.join(map(str, w.get('top_sources') or [])))}</td></tr>"
        )
    out.append("</tbody></table>")
    return out


def _graph_details(run: RunData) -> list[str]:
    """A decentralized run's graph with the bytes each edge carried (lowband.decentral)."""
    import base64

    from lowband.report.plots import graph_png

    png = graph_png(run)
    if png is None:
        return []
    data = base64.b64encode(png).decode("ascii")
    return [
        "<h4>Graph</h4>",
        f'<figure><img src="data:image/png;base64,{data}" alt="graph and bytes per edge">'
        "<figcaption>Each edge as wide as the bytes it carried (both directions)</figcaption>"
        "</figure>",
    ]


def _elastic_details(run: RunData) -> list[str]:
    """Failures, recoveries, stalls and the event log of an elastic run."""
    e = run.elastic()
    if e is None or set(e["counts"]) <= {"topology", "edge_bytes"}:  # a static graph run's
        return []
    rec = e["recovery_s"]
    fields = [
        ("worker failures", e["failures"]),
        ("restarts", e["restarts"]),
        ("newcomers admitted", e["joins"]),
        ("admissions refused", e["refused"]),
        ("recoveries (state from a live peer)", e["recoveries"]),
        ("recovery transfer", ", ".join(format_seconds(s) for s in rec) if rec else "-"),
        ("time stalled (syncs beyond the median)", format_seconds(e["stalled_s"])),
        ("synchronisations discarded", e["discarded"]),
        ("parity repairs", e["parity_repairs"]),
        ("slow-rank flags", e["slow_ranks"]),
        ("workers that left behind", e["left"]),
    ]
    out = ["<h4>Elastic training</h4><dl>"]
    out += [f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in fields]
    out.append("</dl>")
    shown = [ev for ev in run.events if ev["event"] != "quorum"][:100]
    if shown:
        out.append('<details><summary>event log</summary><table class="ops"><thead><tr>')
        # Each process has its own clock (a restarted worker's starts again at 0): order by step;
        # the launcher's events (deaths, restarts, admissions) carry no step and come first.
        out.append("<th>step</th><th>worker</th><th>clock</th><th>event</th><th>details</th></tr>")
        out.append("</thead><tbody>")
        order = lambda x: (x.get("step", -1), _as_float(x.get("wall_time")))  # noqa: E731
        for ev in sorted(shown, key=order):
            rest = {k: v for k, v in ev.items() if k not in ("event", "wall_time", "rank", "step")}
            out.append(
                f"<tr><td>{_esc(ev.get('step', ''))}</td>"
                f"<td>{_esc(ev.get('rank', 'launcher'))}</td>"
                f'<td class="num">{_esc(format_seconds(_as_float(ev.get("wall_time"))))}</td>'
                f"<td>{_esc(ev['event'])}</td>"
                f"<td>{_esc(json.dumps(rest, default=str))}</td></tr>"
            )
        out.append("</tbody></table></details>")
    return out


def _as_float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1200px; margin: 2em auto; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.muted { color: #777; font-size: 0.9em; }
.warn { background: #fff4e0; border-left: 4px solid #f0a020; padding: 0.5em 0.8em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.35em 0.6em; vertical-align: top; }
th { background: #f3f3f3; text-align: left; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafafa; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.best { background: #e6f4e6; }
td.complete { color: #2a7a2a; } td.incomplete { color: #b06000; font-weight: bold; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px;
          margin-right: 0.4em; vertical-align: baseline; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
section.run { margin-bottom: 1.5em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; margin: 0.4em 0; }
dt { color: #666; } dd { margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace;
                         font-size: 0.9em; word-break: break-all; }
ul.warnings { color: #b06000; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""
