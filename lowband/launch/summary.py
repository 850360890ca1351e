"""RUN/summary.json for an elastic job, merged from the workers' own RUN/summaries/rank*.json.

No process group outlives an elastic job to gather the figures, so each worker writes
{"row": [bytes sent, bytes received, compute s, comm s, wall s], "by_op": {op: {"bytes_sent"}},
"eval_loss", "train_loss"} and the launcher merges them as train's loop does for a fixed group:
one row per worker, bytes per op averaged over the workers, the losses from the first file by
name (rank0.json when worker 0 finished).
"""

from __future__ import annotations

from lowband.algorithms.robust import robust_label
from lowband.config import TrainConfig
from lowband.errors import RunFileError
from lowband.train.loop import summary_from_rows, total_steps
from lowband.train.rundir import RunDir, write_json_atomic


def write_summary(
    cfg: TrainConfig, run: RunDir, finished: set[int], failed: dict[int, int]
) -> None:
    parts = run.worker_summaries()  # each checked: a corrupt one is named, in one line
    if not parts:
        raise RunFileError(f"{run.path / 'summaries'} holds no worker summary (rank*.json)")
    rows = [s["row"] for s in parts]
    by_op: dict[str, dict[str, float]] = {}
    for s in parts:
        for op, v in s["by_op"].items():
            by_op.setdefault(op, {"bytes_sent": 0.0})
            by_op[op]["bytes_sent"] += v["bytes_sent"]
    first = parts[0]
    summary = summary_from_rows(
        rows,
        {k: {"bytes_sent": v["bytes_sent"] / len(rows)} for k, v in by_op.items()},  # per worker
        total_steps(cfg, cfg.workers),
        cfg.batch_size * cfg.seq_len * cfg.workers,
        first["eval_loss"],
        first["train_loss"],
    )
    summary["elastic"] = {"finished": sorted(finished), "failed": sorted(failed)}
    if (robust := robust_label(cfg.to_dict())) is not None:
        summary["robust"] = robust
    write_json_atomic(run.summary_path, summary)
