"""Load a finished (or crashed) run folder into numpy arrays the report can plot and tabulate.

A run folder, as the training loop writes it::

    runs/NAME/
      config.json          resolved training config ("algo", "model", "workers", "link", ...)
      meta.json            versions, host, device, corpus, model_params, world_size
      metrics/rankN.jsonl  one JSON object per logged step, per worker
      summary.json         written at the end; missing when the run crashed

Everything the report shows is computed from the metrics, so a crashed run (no summary.json, fewer
lines, a half-written last line) is reported the same way as a finished one and marked incomplete.
config.json, meta.json and summary.json are written atomically, so one that is not valid JSON, or
whose fields are not of the types lowband writes, is corrupt: one line naming it
(lowband.train.rundir.read_json), never a traceback from deep inside the report.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowband.errors import LowbandError
from lowband.train.rundir import CORPUS, META, SUMMARY, check_fields, read_config, read_json

_RANK_FILE = re.compile(r"^rank(\d+)\.jsonl$")

# Per-line keys we read; any other key ("outer_step", "events", ...) is ignored.
_SERIES_KEYS = (
    "tokens",
    "train_loss",
    "lr",
    "bytes_sent",
    "bytes_recv",
    "compute_time",
    "comm_time",
    "wall_time",
    "outer_step",
    "peak_sync_bytes",
)


@dataclass
class RankSeries:
    """One worker's metrics, sorted by step; a value missing on a line is NaN."""

    rank: int
    steps: np.ndarray
    tokens: np.ndarray
    train_loss: np.ndarray
    lr: np.ndarray
    bytes_sent: np.ndarray
    bytes_recv: np.ndarray
    compute_time: np.ndarray
    comm_time: np.ndarray
    wall_time: np.ndarray
    outer_step: np.ndarray
    """Outer steps (fragment syncs) completed; NaN for algorithms without them."""
    peak_sync_bytes: np.ndarray
    """Largest number of bytes one worker sent in one outer sync so far; NaN where absent."""
    eval_steps: np.ndarray
    eval_loss: np.ndarray

    def last(self, key: str) -> float:
        """The value of `key` on this worker's last logged line."""
        return float(getattr(self, key)[-1])


@dataclass
class RunData:
    """One run, ready to plot.

    The step-indexed arrays follow the reference rank (rank 0, or the lowest rank that logged
    anything). `train_loss`, `bytes_sent` and `bytes_recv` are means over the workers that logged
    that step: each worker's train loss is on its own shard of the batch, and the bytes axis is
    "bytes sent per worker". `tokens` is already global (all workers) in the metrics format.
    The bytes arrays are NaN at steps that not every worker logged (a crashed run's ragged end).
    """

    path: Path
    label: str
    config: dict[str, Any]
    meta: dict[str, Any]
    summary: dict[str, Any] | None
    ranks: dict[int, RankSeries]
    steps: np.ndarray
    tokens: np.ndarray
    train_loss: np.ndarray
    lr: np.ndarray
    wall_time: np.ndarray
    bytes_sent: np.ndarray
    bytes_recv: np.ndarray
    eval_steps: np.ndarray
    eval_tokens: np.ndarray
    eval_loss: np.ndarray
    eval_wall_time: np.ndarray
    eval_bytes_sent: np.ndarray
    warnings: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    """Event lines (elastic training and fault detection): each worker's, with its "rank", and
    the launcher's (metrics/events.jsonl: worker deaths, restarts, admissions), without one."""

    def elastic(self) -> dict[str, Any] | None:
        """Participants over steps, failures, recoveries and stalls; None for a non-elastic run."""
        if not self.events:
            return None
        kinds: dict[str, list[dict[str, Any]]] = {}
        for e in self.events:
            kinds.setdefault(e["event"], []).append(e)
        quorums = sorted(
            {
                (e["step"], e["participants"])
                for e in kinds.get("quorum", [])
                if isinstance(e.get("step"), int) and isinstance(e.get("participants"), int)
            }
        )
        recovered = kinds.get("recovered", [])
        # A stall is a synchronisation that took longer than usual: every quorum event's time
        # beyond the median synchronisation of the run, summed over the reference worker.
        ref = min(self.ranks) if self.ranks else 0
        normal = [_num(e.get("sync_s")) for e in kinds.get("quorum", []) if e.get("rank") == ref]
        normal = [x for x in normal if math.isfinite(x)]
        median = float(np.median(normal)) if normal else 0.0
        return {
            "participants": quorums,
            "failures": len(kinds.get("worker_died", [])),
            "restarts": len(kinds.get("worker_restarted", [])),
            "joins": len(kinds.get("admitted", [])),
            "refused": len(kinds.get("admission_refused", [])),
            "recoveries": len(recovered),
            "recovery_s": [_num(e.get("transfer_s", e.get("seconds", 0.0))) for e in recovered],
            "stalled_s": float(sum(max(0.0, s - median) for s in normal)),
            "discarded": len(kinds.get("sync_discarded", [])),
            "parity_repairs": len(kinds.get("parity_mismatch", [])),
            "slow_ranks": len(kinds.get("slow_rank", [])),
            "left": len(kinds.get("left", [])),
            "counts": {k: len(v) for k, v in sorted(kinds.items())},
        }

    @property
    def expected_workers(self) -> int:
        """How many workers the run was started with (meta, then config, then what logged)."""
        for value in (self.meta.get("world_size"), self.config.get("workers")):
            if isinstance(value, int) and value > 0:
                return value
        return len(self.ranks)

    @property
    def complete(self) -> bool:
        """A run is complete when it wrote summary.json and every worker logged metrics."""
        return self.summary is not None and len(self.ranks) >= self.expected_workers

    def final(self) -> dict[str, Any]:
        """The numbers of the report table, all from the metrics' last lines.

        Keys: final_eval_loss, loss_source ("eval", "summary", "train" or "none"), tokens,
        bytes_sent_total (sum over workers), bytes_sent_per_worker (mean over workers that logged),
        tokens_per_s, compute_utilisation (a fraction: sum of compute_time / sum of wall_time over
        workers, each at its last line), exposed_comm_fraction (the same with comm_time),
        outer_steps and peak_sync_bytes (NaN for algorithms without outer steps), wall_time
        (seconds, reference rank), workers, complete.
        """
        loss, source = _final_loss(self)
        ranks = list(self.ranks.values())
        bytes_total = float(sum(r.last("bytes_sent") for r in ranks))
        compute = sum(r.last("compute_time") for r in ranks)
        exposed = sum(r.last("comm_time") for r in ranks)
        wall_sum = sum(r.last("wall_time") for r in ranks)
        tokens = float(self.tokens[-1])
        wall = float(self.wall_time[-1])
        return {
            "final_eval_loss": loss,
            "loss_source": source,
            "tokens": tokens,
            "bytes_sent_total": bytes_total,
            "bytes_sent_per_worker": bytes_total / len(ranks),
            "tokens_per_s": tokens / wall if wall > 0 else math.nan,
            "compute_utilisation": compute / wall_sum if wall_sum > 0 else math.nan,
            "wall_time": wall,
            "exposed_comm_fraction": exposed / wall_sum if wall_sum > 0 else math.nan,
            "outer_steps": ranks[0].last("outer_step"),
            "peak_sync_bytes": max(r.last("peak_sync_bytes") for r in ranks),
            "workers": len(ranks),
            "complete": self.complete,
        }


def _final_loss(run: RunData) -> tuple[float, str]:
    # The last eval, even if NaN: a run that diverged should read as diverged, not as its last
    # good value. Without any eval line, fall back to summary.json, then to the train loss.
    if run.eval_loss.size:
        return float(run.eval_loss[-1]), "eval"
    value = (run.summary or {}).get("final_eval_loss")
    if isinstance(value, int | float):
        return float(value), "summary"
    if run.train_loss.size:
        return float(run.train_loss[-1]), "train"
    return math.nan, "none"


def load_run(path: Path | str, label: str | None = None) -> RunData:
    """Read a run folder; `label` defaults to the folder name.

    Raises LowbandError with one line if `path` is not a run folder (no metrics/) or its metrics
    are empty or corrupt. A half-written last line (a crash mid-write) is skipped with a warning.
    """
    path = Path(path)
    metrics_dir = path / "metrics"
    if not metrics_dir.is_dir():
        raise LowbandError(f"{path} is not a run folder (no metrics/ directory)")
    warnings: list[str] = []
    config = _read_json(path / "config.json", warnings, read_config) or {}
    meta = _read_json(path / "meta.json", warnings, _read_meta) or {}
    summary = _read_json(path / "summary.json", warnings, _read_summary, crash_ok=True)

    ranks: dict[int, RankSeries] = {}
    events: list[dict[str, Any]] = []  # elastic training: failures, recoveries, quorums (#4)
    for file in sorted(metrics_dir.iterdir()):
        match = _RANK_FILE.match(file.name)
        if match is None:
            continue
        lines = _read_jsonl(file, warnings)
        rank = int(match.group(1))
        events += [{**r, "rank": rank} for r in lines if isinstance(r.get("event"), str)]
        lines = [r for r in lines if "event" not in r]
        if lines:
            ranks[rank] = _to_series(rank, lines)
    events += _launcher_events(metrics_dir / "events.jsonl", warnings)
    if not ranks:
        raise LowbandError(f"{metrics_dir} holds no metrics (no non-empty rankN.jsonl)")

    ref = ranks[min(ranks)]
    eval_src = next((r for _, r in sorted(ranks.items()) if r.eval_steps.size), ref)
    eval_idx = np.searchsorted(eval_src.steps, eval_src.eval_steps)
    run = RunData(
        path=path,
        label=label if label is not None else path.name,
        config=config,
        meta=meta,
        summary=summary,
        ranks=ranks,
        steps=ref.steps,
        tokens=ref.tokens,
        train_loss=_mean_over_ranks(ranks, ref.steps, "train_loss", partial=True),
        lr=ref.lr,
        wall_time=ref.wall_time,
        bytes_sent=_mean_over_ranks(ranks, ref.steps, "bytes_sent"),
        bytes_recv=_mean_over_ranks(ranks, ref.steps, "bytes_recv"),
        eval_steps=eval_src.eval_steps,
        eval_tokens=eval_src.tokens[eval_idx],
        eval_loss=eval_src.eval_loss,
        eval_wall_time=eval_src.wall_time[eval_idx],
        eval_bytes_sent=_mean_over_ranks(ranks, eval_src.eval_steps, "bytes_sent"),
        warnings=warnings,
        events=events,
    )
    if ref.rank != 0:
        warnings.append(f"rank 0 logged nothing; rank {ref.rank} is the reference")
    if summary is None:
        warnings.append("no summary.json: the run did not finish")
    if len(ranks) < run.expected_workers:
        warnings.append(f"only ranks {sorted(ranks)} of {run.expected_workers} logged metrics")
    if not eval_src.eval_steps.size:
        warnings.append("no eval_loss in the metrics")
    return run


def unique_labels(paths: list[Path]) -> list[str]:
    """Folder names; a repeated name gets its parent folder (`a/run`, `b/run`), then a counter."""
    names = [p.name or str(p) for p in paths]
    labels = []
    for p, name in zip(paths, names):
        group = [q for q, n in zip(paths, names) if n == name]
        parents = {f"{q.parent.name}/{name}" for q in group}
        labels.append(f"{p.parent.name}/{name}" if len(parents) == len(group) > 1 else name)
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _read_json(file: Path, warnings: list[str], read, *, crash_ok: bool = False):
    """read(file): a checked JSON object, or None if the file is missing (noted in `warnings`
    unless `crash_ok`: a run that crashed wrote no summary)."""
    if not file.exists():
        if not crash_ok:
            warnings.append(f"{file.name} is missing")
        return None
    return read(file)


def _read_meta(file: Path) -> dict[str, Any]:
    meta = read_json(file, optional=META)
    check_fields(file, meta.get("corpus") or {}, {}, CORPUS)
    return meta


def _read_summary(file: Path) -> dict[str, Any]:
    return read_json(file, optional=SUMMARY)


def _read_jsonl(file: Path, warnings: list[str]) -> list[dict[str, Any]]:
    try:
        raw = file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LowbandError(f"cannot read {file}: {e}") from None
    lines = [(n, text) for n, text in enumerate(raw, 1) if text.strip()]
    records = []
    for i, (n, text) in enumerate(lines):
        try:
            record = json.loads(text)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as e:
            if i == len(lines) - 1 and i > 0:  # the line a crash cut short
                warnings.append(f"{file.name}: skipped a truncated last line ({n})")
                break
            raise LowbandError(f"{file}:{n} is corrupt: {e}") from None
        records.append(record)
    return records


def _launcher_events(file: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """The elastic launcher's event lines (no step): skipped lines are noted, never fatal."""
    if not file.exists():
        return []
    out = []
    try:
        raw = file.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        raise LowbandError(f"cannot read {file}: {e.strerror or e}") from None
    for n, text in enumerate(raw, 1):
        try:
            record = json.loads(text)
        except ValueError:
            warnings.append(f"{file.name}: skipped an unreadable line ({n})")
            continue
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            out.append(record)
    return out


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _to_series(rank: int, records: list[dict[str, Any]]) -> RankSeries:
    # A resumed run may log a step twice; the later line wins, then sort by step.
    by_step = {r["step"]: r for r in records}
    steps = np.array(sorted(by_step), dtype=np.int64)
    ordered = [by_step[s] for s in steps.tolist()]
    cols = {k: np.array([_num(r.get(k)) for r in ordered], dtype=np.float64) for k in _SERIES_KEYS}
    evals = [(r["step"], _num(r["eval_loss"])) for r in ordered if "eval_loss" in r]
    return RankSeries(
        rank=rank,
        steps=steps,
        eval_steps=np.array([s for s, _ in evals], dtype=np.int64),
        eval_loss=np.array([v for _, v in evals], dtype=np.float64),
        **cols,
    )


def _mean_over_ranks(
    ranks: dict[int, RankSeries], steps: np.ndarray, key: str, *, partial: bool = False
) -> np.ndarray:
    """Mean of `key` at each of `steps` over the ranks that logged that step.

    Unless `partial`, a step that not every rank logged (the tail of a crashed run) is NaN: with
    ranks that send different amounts, a mean over a changing set of ranks would jump backwards.
    """
    total = np.zeros(len(steps))
    count = np.zeros(len(steps))
    for series in ranks.values():
        idx = np.searchsorted(series.steps, steps)
        idx_safe = np.minimum(idx, len(series.steps) - 1)
        hit = series.steps[idx_safe] == steps
        total[hit] += getattr(series, key)[idx_safe[hit]]
        count[hit] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        enough = count > 0 if partial else count == len(ranks)
        return np.where(enough, total / np.maximum(count, 1), np.nan)
