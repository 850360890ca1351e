"""Starting workers: N local processes on Gloo, or one process per GPU under torchrun.

Local launch (`lowband train --workers N`): the parent validates everything it can (so bad input
fails in one line before any process starts), then spawns N processes that rendezvous over TCP on
127.0.0.1. If any worker dies, the others are stopped and the parent reports which one and why.

Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR in the environment) this process is one worker; the
rendezvous comes from the environment, NCCL on GPUs, Gloo otherwise. The same command scales to
many hosts (the run folder should be on a shared filesystem for checkpoints).
"""

from __future__ import annotations

import datetime
import math
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from lowband.comm import Comm, LinkSpec
from lowband.config import TrainConfig
from lowband.errors import ConfigError, LowbandError
from lowband.train.loop import train_worker
from lowband.train.rundir import RunDir

_TIMEOUT = datetime.timedelta(minutes=10)


class WorkerFailed(Exception):
    def __init__(self, rank: int, exitcode: int, message: str) -> None:
        super().__init__(message)
        self.rank, self.exitcode = rank, exitcode


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def pick_device(cfg: TrainConfig, local_workers: int) -> str:
    """'cuda' when asked or (auto) when every local worker can have a GPU of its own; else 'cpu'."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.device == "cpu":
        return "cpu"
    if cfg.device == "cuda":
        if have < local_workers:
            raise ConfigError(
                f"--device cuda needs {local_workers} GPU(s), this machine has {have}"
            )
        return "cuda"
    if cfg.device != "auto":
        raise ConfigError(f"unknown --device {cfg.device!r}; choose cpu, cuda or auto")
    return "cuda" if have >= local_workers and have > 0 else "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shutdown() -> None:
    # Tearing down a Gloo group while a peer is still inside its last collective can abort the
    # process ("terminate called without an active exception"): meet at a barrier first.
    dist.barrier()
    dist.destroy_process_group()


def _worker_main(
    rank, world, port, cfg_dict, run_path, resume, device_kind, errors, worker, cfg_cls
) -> None:
    cfg = cfg_cls.from_dict(cfg_dict)
    torch.set_num_threads(cfg.threads)
    try:
        if device_kind == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(
            "nccl" if device_kind == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=_TIMEOUT,
            **({"device_id": device} if device_kind == "cuda" else {}),
        )
        comm = Comm(dist.group.WORLD, LinkSpec.parse(cfg.link), seed=cfg.seed, device=device)
        worker(cfg, comm, RunDir(run_path), device, resume=resume)
        _shutdown()
    except LowbandError as e:
        errors.put((rank, 2, str(e)))
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - a bug or a lost peer
        if not _lost_peer(e):  # a peer's death is reported by the parent; a bug keeps its traceback
            traceback.print_exc()
        errors.put((rank, 1, f"{type(e).__name__}: {e}".splitlines()[0]))
        sys.exit(1)


def launch_local(cfg: TrainConfig, run: RunDir, resume: bool, worker=train_worker) -> None:
    """Run `worker(cfg, comm, run, device, resume=...)` on cfg.workers local processes (train's
    loop by default; `lowband finetune` passes lowband.zo.loop.finetune_worker and its config)."""
    n = cfg.workers
    device_kind = pick_device(cfg, n)
    if n == 1:
        torch.set_num_threads(cfg.threads)
        device = torch.device("cuda", 0) if device_kind == "cuda" else torch.device("cpu")
        worker(cfg, Comm(None, LinkSpec.parse(cfg.link)), run, device, resume=resume)
        return
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(
                r,
                n,
                port,
                cfg.to_dict(),
                str(run.path),
                resume,
                device_kind,
                errors,
                worker,
                type(cfg),
            ),
            name=f"lowband-worker-{r}",
        )
        for r in range(n)
    ]
    for p in procs:
        p.start()
    first_failed: list[tuple[int, int]] = []  # the workers found dead first: the root cause
    try:
        while any(p.is_alive() for p in procs):
            first_failed = [
                (r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)
            ]
            if first_failed:
                break
            time.sleep(0.05)
        for p in procs:
            p.join(timeout=2.0)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
    failed = first_failed or [
        (r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (0, None)
    ]
    if not failed:
        return
    messages = _worker_messages(errors)
    r, code = failed[0]
    detail = messages[r][1] if r in messages else f"exited with code {code}"
    raise WorkerFailed(r, 1, f"worker {r} failed ({detail}); the other workers were stopped")


def _worker_messages(errors) -> dict[int, tuple[int, str]]:
    """What the workers put on the error queue; bad input found inside one is raised as such."""
    messages: dict[int, tuple[int, str]] = {}
    try:
        while True:
            r, code, msg = errors.get(timeout=0.2)
            messages[r] = (code, msg)
    except queue.Empty:
        pass
    for r, (code, msg) in sorted(messages.items()):
        if code == 2:
            raise WorkerFailed(r, 2, msg)
    return messages


def _lost_peer(e: Exception) -> bool:
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "Connection reset" in text or "Connection closed" in text
    )


def launch_torchrun(cfg: TrainConfig, run_path: Path, resume: bool, worker=train_worker) -> None:
    """This process is one worker of a torchrun job (running `worker`, as in launch_local)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    torch.set_num_threads(cfg.threads)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=_TIMEOUT)
    comm = Comm(dist.group.WORLD, LinkSpec.parse(cfg.link), seed=cfg.seed, device=device)
    run = RunDir(run_path)
    worker(cfg, comm, run, device, resume=resume)
    _shutdown()


# -- elastic training (lowband.fault.elastic) ------------------------------------------------------
def quiet_torchft() -> None:
    """torchft logs every quorum at INFO (Rust and Python): keep its warnings and errors only."""
    import http.server
    import logging
    import warnings

    os.environ.setdefault("RUST_LOG", "warn")
    logging.getLogger("torchft").setLevel(logging.ERROR)
    # A state transfer is one HTTP GET served by torchft inside the worker: no access log line.
    http.server.BaseHTTPRequestHandler.log_message = lambda *_: None
    warnings.filterwarnings("ignore", message="The given buffer is not writable")


def _elastic_worker_main(index, cfg_dict, run_path, lighthouse, joining, store, errors) -> None:
    from lowband.fault.elastic import JobStateLost
    from lowband.train.loop import Seat

    cfg = TrainConfig.from_dict(cfg_dict)
    torch.set_num_threads(cfg.threads)
    quiet_torchft()
    try:
        train_worker(
            cfg,
            Comm(None, LinkSpec.parse(cfg.link), seed=cfg.seed),
            RunDir(run_path),
            torch.device("cpu"),
            seat=Seat(index=index, lighthouse=lighthouse, joining=joining, store=store),
        )
    except JobStateLost as e:
        errors.put((index, 3, str(e)))
        sys.exit(3)
    except LowbandError as e:
        errors.put((index, 2, str(e)))
        sys.exit(2)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        errors.put((index, 1, f"{type(e).__name__}: {e}".splitlines()[0]))
        sys.exit(1)
    # torchft's threads (heartbeats, gRPC) can keep a finished interpreter alive: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_elastic(cfg: TrainConfig, run: RunDir) -> None:
    """N local workers under a Lighthouse in this process; dead workers restart up to --restarts.

    The job goes on while at least --min-workers are alive. The parent serves admission for
    `lowband join` (the run's secret is in RUN/secret, readable by its owner only), logs worker
    deaths and restarts to RUN/metrics/events.jsonl, and merges the workers' summaries at the end.
    """
    import json

    from lowband.fault.admission import AdmissionServer, generate_secret
    from lowband.fault.elastic import start_lighthouse
    from lowband.train.loop import summary_from_rows, total_steps
    from lowband.train.rundir import write_json_atomic

    quiet_torchft()
    lighthouse = None
    if cfg.lighthouse:
        address = cfg.lighthouse
    else:
        lighthouse = start_lighthouse(
            cfg.min_workers,
            join_timeout_s=cfg.join_timeout,
            heartbeat_timeout_s=cfg.heartbeat_timeout,
        )
        address = lighthouse.address()
    events_path = run.path / "metrics" / "events.jsonl"
    events_path.parent.mkdir(parents=True, exist_ok=True)
    events = open(events_path, "a", buffering=1)
    t_start = time.perf_counter()

    def event(kind: str, **fields) -> None:
        events.write(
            json.dumps({"event": kind, "wall_time": time.perf_counter() - t_start, **fields}) + "\n"
        )

    secret = generate_secret()
    secret_path = run.path / "secret"
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    next_index = [cfg.workers]
    host = socket.gethostname()
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
    store_address = f"{host}:{store.port}"

    def payload(joiner: str) -> bytes:
        index, next_index[0] = next_index[0], next_index[0] + 1
        event("admitted", joiner=joiner, index=index)
        return json.dumps(
            {
                "lighthouse": address,
                "store": store_address,
                "config": cfg.to_dict(),
                "run": str(run.path),
                "index": index,
            }
        ).encode()

    admission = AdmissionServer(
        secret,
        host="0.0.0.0",
        run_id=run.path.name,
        payload=payload,
        on_event=lambda e: (
            None
            if e.get("accepted")
            else event("admission_refused", **{k: v for k, v in e.items() if k != "event"})
        ),
    ).start()
    write_json_atomic(
        run.path / "elastic.json",
        {"admission": f"{host}:{admission.address[1]}", "workers": cfg.workers},
    )
    print(
        f"elastic job: {cfg.workers} workers, lighthouse {address}; add a worker with\n"
        f"  lowband join {run.path}            (same host)\n"
        f"  lowband join --admission {host}:{admission.address[1]} --token-file SECRET_FILE"
        f"   (another host; SECRET_FILE holds {secret_path}'s line)",
        file=sys.stderr,
    )

    ctx = mp.get_context("spawn")
    errors = ctx.Queue()

    def spawn(index: int, joining: bool):
        p = ctx.Process(
            target=_elastic_worker_main,
            args=(
                index,
                cfg.to_dict(),
                str(run.path),
                address,
                joining,
                store_address,
                errors,
            ),  # fmt: skip
            name=f"lowband-worker-{index}",
        )
        p.start()
        return p

    procs = {i: spawn(i, False) for i in range(cfg.workers)}
    restarts_left = cfg.restarts
    finished: set[int] = set()
    failed: dict[int, int] = {}
    give_up_at = math.inf  # once a worker has finished, the others get this long to finish too
    lost = False  # every worker that held the job's state died (JobStateLost)
    try:
        while procs:
            time.sleep(0.05)
            if time.monotonic() > give_up_at:
                for i, p in procs.items():
                    p.kill()
                    event(
                        "worker_stopped",
                        index=i,
                        reason="still running long after the job finished",
                    )
                    failed[i] = -9
                procs.clear()
                break
            for i, p in list(procs.items()):
                if p.exitcode is None:
                    continue
                del procs[i]
                if p.exitcode == 0:
                    finished.add(i)
                    give_up_at = min(give_up_at, time.monotonic() + cfg.timeout + cfg.join_timeout)
                    continue
                event("worker_died", index=i, exitcode=p.exitcode)
                if p.exitcode == 3:  # JobStateLost: restarting cannot help
                    lost = True
                if restarts_left > 0 and not finished and not lost:
                    restarts_left -= 1
                    event("worker_restarted", index=i)
                    procs[i] = spawn(i, True)
                else:
                    failed[i] = p.exitcode
    finally:
        for p in procs.values():
            p.kill()
        admission.close()
        if lighthouse is not None:
            lighthouse.shutdown()
        events.close()
    messages = _worker_messages(errors)
    if lost and not finished:
        text = next((m for c, m in messages.values() if c == 3), "the job's state was lost")
        raise WorkerFailed(min(failed) if failed else 0, 1, text)
    if not finished:
        r = min(failed) if failed else 0
        detail = messages.get(r, (1, f"exited with code {failed.get(r)}"))[1]
        raise WorkerFailed(r, 1, f"every worker failed; worker {r}: {detail}")
    parts = [json.loads(f.read_text()) for f in sorted((run.path / "summaries").glob("rank*.json"))]
    rows, by_op = [s["row"] for s in parts], {}
    for s in parts:
        for op, v in s["by_op"].items():
            by_op.setdefault(op, {"bytes_sent": 0.0})
            by_op[op]["bytes_sent"] += v["bytes_sent"]
    steps = total_steps(cfg, cfg.workers)
    first = parts[0]
    summary = summary_from_rows(
        rows,
        {k: {"bytes_sent": v["bytes_sent"] / len(rows)} for k, v in by_op.items()},  # per worker
        steps,
        cfg.batch_size * cfg.seq_len * cfg.workers,
        first["eval_loss"],
        first["train_loss"],
    )
    summary["elastic"] = {"finished": sorted(finished), "failed": sorted(failed)}
    write_json_atomic(run.summary_path, summary)


def join_job(payload: dict, device: str = "cpu") -> None:
    """Run one newcomer worker in this process (after `lowband join` was admitted)."""
    from lowband.train.loop import Seat

    cfg = TrainConfig.from_dict(payload["config"])
    torch.set_num_threads(cfg.threads)
    quiet_torchft()
    run = RunDir(payload["run"])
    train_worker(
        cfg,
        Comm(None, LinkSpec.parse(cfg.link), seed=cfg.seed),
        run,
        torch.device(device),
        seat=Seat(
            index=int(payload["index"]),
            lighthouse=payload["lighthouse"],
            joining=True,
            store=payload.get("store"),
        ),
    )
