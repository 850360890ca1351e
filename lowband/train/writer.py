"""`lowband.RunWriter`: your own loop writes the run folder `lowband train` writes.

    run = lowband.RunWriter("runs/mine", comm, algo=algo, model=model, corpus=corpus,
                            tokens_per_step=batch_size * seq_len * comm.size)
    for step in range(1, steps + 1):
        ...                                  # your step: forward, backward, opt.step(), algo
        run.log(step, train_loss=loss.item(), eval_loss=evaluate() if step % 50 == 0 else None)
    run.finish()                             # summary.json; `with RunWriter(...) as run:` does it

    lowband report runs/mine runs/ddp-1m-20260101-120000    # beside CLI runs

Every rank makes one and logs its own metrics (metrics/rankR.jsonl); rank 0 writes config.json,
meta.json and, at `finish()`, summary.json, all in the layout of lowband.train.rundir and with
the functions `lowband train` uses (RunDir, run_meta, MetricsWriter, summary_from_rows). A line
carries what a CLI run's does: tokens, losses, the Comm's cumulative bytes and exposed
communication seconds, wall-clock since the writer was made, and the algorithm's own fields
(outer_step, peak_sync_bytes); bytes count from the Comm's start (an algorithm's start-up check
included), seconds from the writer's. Compute time is wall-clock less exposed communication (your
evaluations included); pass `compute_time=` to `log` if you time your steps yourself. Log step 0
(`run.log(0, eval_loss=...)`) for the curve to start at the untrained model.

The writer's own synchronisation (rank 0 made the folder; every rank's totals for the summary)
runs on the Comm's process group directly, so that `comm.stats` counts training traffic only.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lowband.comm import Comm
from lowband.errors import RunDirError
from lowband.train.loop import MetricsWriter, summary_from_rows
from lowband.train.meta import run_meta
from lowband.train.rundir import RunDir, write_json_atomic

# run_meta records a corpus; a loop on its own data has none of lowband's (meta "corpus": null).
_NO_CORPUS = SimpleNamespace(name=None, sha256=None, tokens=(), description=None)


class RunWriter:
    """The run folder of one worker's own training loop (module docstring)."""

    def __init__(
        self,
        path: str | Path,
        comm: Comm,
        *,
        tokens_per_step: int,
        algo: Any = None,
        model: nn.Module | str | None = None,
        corpus: Any = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        """
        path: the run folder; like `lowband train --out`, one that holds anything is refused.
        tokens_per_step: tokens one step processes over all workers (batch x length x workers).
        algo: the lowband algorithm (its name, options and metrics), or a name ("zo", ...).
        model: the model (its class name and parameter count) or a name ("1m").
        corpus: a lowband.data.Corpus, recorded by name and sha256 (the report warns when runs
            trained on different data).
        config: more fields for config.json (the report's table reads "algo", "model",
            "workers", "link" and the robust ones); they win over what the writer fills in.
        """
        self.run, self.comm, self.tokens_per_step = RunDir(path), comm, tokens_per_step
        self.rank, self.algo = comm.rank, None if isinstance(algo, str) else algo
        self._t0, self._comm0 = time.perf_counter(), comm.stats.seconds
        self.step = 0
        self.train_loss: float | None = None
        self.eval_loss: float | None = None
        self._compute = 0.0
        error = ""
        if self.rank == 0:
            try:
                self.run.create(SimpleNamespace(to_dict=lambda: self._config(algo, model, config)))
                write_json_atomic(self.run.meta_path, self._meta(model, corpus))
            except RunDirError as e:
                error = str(e)
        # Nobody writes before rank 0 has made (or refused) the folder: the others would make it
        # look taken. Every rank learns whether it could, and why not.
        error = self._from_rank_0(error)
        if error:
            raise RunDirError(error)
        self._metrics: MetricsWriter | None = MetricsWriter(self.run.metrics_path(self.rank))

    # -- what the folder records -----------------------------------------------------------------
    def _config(self, algo: Any, model: Any, config: dict[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {"own_loop": True}
        if isinstance(algo, str):
            out["algo"] = algo
        elif algo is not None:
            out["algo"] = getattr(algo, "name", "") or type(algo).__name__
            options = getattr(algo, "options", None)
            if dataclasses.is_dataclass(options):
                out["options"] = dataclasses.asdict(options)
        if model is not None:
            out["model"] = model if isinstance(model, str) else type(model).__name__
        out.update(
            workers=self.comm.size,
            link=str(self.comm.link_map or self.comm.link) if self.comm.link else None,
        )
        out["tokens_per_step"] = self.tokens_per_step
        return {**out, **(config or {})}

    def _meta(self, model: Any, corpus: Any) -> dict[str, Any]:
        params = sum(p.numel() for p in model.parameters()) if isinstance(model, nn.Module) else 0
        group = self.comm.group
        meta = run_meta(
            corpus=corpus if corpus is not None else _NO_CORPUS,
            model_params=params,
            world_size=self.comm.size,
            device=self.comm.device,
            backend=group.name() if group is not None else "none",
        )
        if corpus is None:
            meta["corpus"] = None
        if not params:
            del meta["model_params"]
        return meta

    # -- the loop's side -------------------------------------------------------------------------
    def wall(self) -> float:
        """Seconds since the writer was made."""
        return time.perf_counter() - self._t0

    def log(
        self,
        step: int,
        *,
        train_loss: float | None = None,
        eval_loss: float | None = None,
        lr: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Write this worker's metrics line for `step` (steps count from 1; step 0 is the model
        before training). `fields` are added to the line, or override the writer's (tokens,
        compute_time, ...). Returns the line."""
        if self._metrics is None:
            raise RuntimeError("RunWriter.log() after finish()")
        stats, wall = self.comm.stats, self.wall()
        comm_s = stats.seconds - self._comm0
        record: dict[str, Any] = {
            "step": step,
            "tokens": step * self.tokens_per_step,
            "bytes_sent": stats.bytes_sent,
            "bytes_recv": stats.bytes_recv,
            "compute_time": max(0.0, wall - comm_s),
            "comm_time": comm_s,
            "wall_time": wall,
            "rank": self.rank,
        }
        if self.algo is not None and hasattr(self.algo, "metrics"):
            record.update(self.algo.metrics())  # outer_step, peak_sync_bytes, ...
        for key, value in (("train_loss", train_loss), ("eval_loss", eval_loss), ("lr", lr)):
            if value is not None:
                record[key] = float(value)
        record.update(fields)
        self._metrics.write(record)
        self.step, self._compute = step, float(record["compute_time"])
        self.train_loss = record.get("train_loss", self.train_loss)
        self.eval_loss = record.get("eval_loss", self.eval_loss)
        return record

    def finish(self) -> dict[str, Any]:
        """Write summary.json (rank 0) from every worker's totals, as `lowband train` does, and
        close the metrics file. Every rank calls it; returns the summary on every rank."""
        if self._metrics is None:
            raise RuntimeError("RunWriter.finish() called twice")
        stats = self.comm.stats
        row = [
            float(stats.bytes_sent),
            float(stats.bytes_recv),
            self._compute,
            stats.seconds - self._comm0,
            self.wall(),
        ]
        by_op = stats.by_op()
        table = self._gather(row)
        summary = summary_from_rows(
            table, by_op, self.step, self.tokens_per_step, self.eval_loss, self.train_loss
        )
        summary["own_loop"] = True
        if self.rank == 0:
            write_json_atomic(self.run.summary_path, summary)
        self.close()
        return summary

    def close(self) -> None:
        """Close the metrics file without a summary (the report shows the run as incomplete)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.close()

    # -- bookkeeping collectives, on the process group itself (not counted) ----------------------
    def _device(self) -> torch.device:
        group = self.comm.group  # Gloo reads host memory, whatever device the Comm stages from
        return torch.device("cpu") if group is None or group.name() == "gloo" else self.comm.device

    def _from_rank_0(self, text: str, size: int = 1024) -> str:
        """Rank 0's `text` (up to `size` bytes of it) on every rank: a sum where only it adds."""
        if self.comm.group is None:
            return text
        buf = torch.zeros(size, dtype=torch.int32, device=self._device())
        if self.rank == 0:
            data = text.encode()[:size]
            buf[: len(data)] = torch.tensor(list(data), dtype=torch.int32)
        self.comm.group.allreduce([buf]).wait()
        return bytes(buf[buf > 0].cpu().tolist()).decode(errors="replace")

    def _gather(self, row: list[float]) -> torch.Tensor:
        mine = torch.tensor(row, dtype=torch.float64, device=self._device())
        if self.comm.group is None:
            return mine.unsqueeze(0).cpu()
        rows = [torch.empty_like(mine) for _ in range(self.comm.size)]
        self.comm.group.allgather([rows], [mine]).wait()
        return torch.stack(rows).cpu()
