"""One hivemind DiLoCo peer (one process) for benchmarks/vs_hivemind.py, OpenDiLoCo-style.

Runs in a separate virtual environment that has hivemind (see vs_hivemind.py), with lowband on
PYTHONPATH for the model, corpus, sampler, schedule and eval, so the task is the one
`lowband train --algo diloco` runs:

    /tmp/hmenv/bin/python benchmarks/_hivemind_worker.py --rank I --workers N --out DIR [...]

OpenDiLoCo (github.com/PrimeIntellect-ai/OpenDiLoCo) keeps DiLoCo's pseudo-gradients in the
buffers of a hivemind DecentralizedAverager and averages them there; this worker does the same
with hivemind's public API and no OpenDiLoCo code (its PyPI package is an empty placeholder):

  1. Rank 0 starts a DHT on 127.0.0.1 and writes its multiaddrs to DIR/maddrs; every other rank
     starts its DHT with those as initial peers. Each DHT process owns one p2pd daemon.
  2. Each rank builds a DecentralizedAverager over N zero tensors shaped like the parameters,
     target_group_size = min_group_size = N (every round averages all workers, as OpenDiLoCo's
     WAIT_FOR_ALL strategy does), then waits at a file barrier until every rank is up.
  3. Inner steps: lowband's AdamW, warmup + cosine, clip 1.0, ShardSampler batches.
  4. Every H steps: pseudo-gradient = snapshot - params into the averager's buffers;
     averager.step() (DHT matchmaking, then hivemind's butterfly all-reduce: each of the N peers
     reduces 1/N of the vector, receiving that part from the N-1 others and sending back the
     averaged deltas); params reset to the snapshot; outer Nesterov SGD with the average as its
     gradient; new snapshot.
  5. After the last step a file barrier, a last socket count, then exit.

Bytes: hivemind counts none, and this machine's loopback carries other jobs' traffic, so
/proc/net/dev cannot be used. Two figures instead:
  * measured: the kernel's per-socket TCP counters (tcp_info bytes_acked, via `ss -tinp`) of every
    TCP connection of this worker's p2pd, read at start, after every round and at the end; the
    sum of their growth during training is what this worker put on the wire (payload: tensors,
    protobuf, libp2p Noise + Yamux framing, DHT and matchmaking traffic; no TCP/IP headers).
    A connection opened and closed between two reads would be missed (none expected: libp2p keeps
    its connections; the count of connections seen is recorded).
  * modelled: 2 (N-1)/N x 4 bytes x parameters per round (butterfly = reduce-scatter +
    all-gather, the same per-rank volume as a ring), the model lowband counts its own bytes with.

Writes DIR/hivemind_rank{I}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from lowband.config import TrainConfig
from lowband.data import ShardSampler, eval_batches, load_corpus, split_eval
from lowband.models import build_model
from lowband.train.loop import evaluate, lr_lambda


def _descendants(pid: int) -> set[int]:
    """This process and all its descendants (the DHT process and its p2pd)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children.get(p, []))
    return out


def tcp_sent(pids: set[int]) -> dict[str, int]:
    """Bytes acked so far per TCP connection owned by one of pids: {"local>peer": bytes}."""
    text = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True).stdout
    out: dict[str, int] = {}
    # ss prints each socket as a header line (state, queues, addresses, users:((...))) followed by
    # an indented line of tcp_info fields.
    blocks = re.split(r"\n(?=\S)", text)
    for b in blocks:
        owners = {int(x) for x in re.findall(r"pid=(\d+)", b)}
        if not owners & pids:
            continue
        head = b.split()
        key = f"{head[3]}>{head[4]}"
        m = re.search(r"bytes_acked:(\d+)", b) or re.search(r"bytes_sent:(\d+)", b)
        out[key] = int(m.group(1)) if m else 0
    return out


def barrier(out: Path, name: str, n: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not all((out / f"{name}{r}").exists() for r in range(n)):
        if time.time() > deadline:
            raise TimeoutError(f"barrier {name}: not every rank arrived in {timeout} s")
        time.sleep(0.05)


def main() -> None:
    p = argparse.ArgumentParser(description="one hivemind DiLoCo peer (see module docstring)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="1m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--sync-every", type=int, default=50)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument(
        "--matchmaking-time",
        type=float,
        default=5.0,
        help="hivemind's min_matchmaking_time (its default; OpenDiLoCo's default is 15)",
    )
    p.add_argument("--averaging-timeout", type=float, default=300.0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import hivemind

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(
        algo="diloco", model=args.model, seed=args.seed, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, workers=args.workers,
        eval_every=args.eval_every, eval_batches=args.eval_batches, device="cpu",
        options=dict(sync_every=args.sync_every, outer_lr=args.outer_lr,
                     outer_momentum=args.outer_momentum),
    )  # fmt: skip
    i, n, steps, H = args.rank, args.workers, args.steps, args.sync_every
    device = torch.device("cpu")
    corpus = load_corpus(cfg.data)
    train_tokens, eval_tokens = split_eval(corpus)
    model = build_model(cfg.model, vocab_size=corpus.vocab_size, seed=cfg.seed, device=device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        params, lr=cfg.resolved_lr(), betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
        foreach=False,  # what lowband's loop passes on CPU
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps))
    outer_opt = torch.optim.SGD(
        params, lr=args.outer_lr, momentum=args.outer_momentum, nesterov=True
    )
    sampler = ShardSampler(
        train_tokens, rank=i, world_size=n, batch_size=cfg.batch_size,
        seq_len=cfg.seq_len, seed=cfg.seed,
    )  # fmt: skip
    evals = eval_batches(
        eval_tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, num_batches=cfg.eval_batches
    )

    # 1. DHT: rank 0 first, the others bootstrap from its multiaddrs.
    t_setup = time.perf_counter()
    maddrs_file = out / "maddrs"
    if i == 0:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        tmp = out / ".maddrs"
        tmp.write_text("\n".join(str(a) for a in dht.get_visible_maddrs()))
        os.replace(tmp, maddrs_file)
    else:
        while not maddrs_file.exists():
            time.sleep(0.05)
        dht = hivemind.DHT(
            start=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            initial_peers=maddrs_file.read_text().split(),
        )
    # 2. The averager over pseudo-gradient buffers; every round wants all N peers.
    averager = hivemind.averaging.DecentralizedAverager(
        averaged_tensors=[torch.zeros_like(p_) for p_ in params],
        dht=dht,
        start=True,
        prefix="lowband_vs_hivemind",
        target_group_size=n,
        min_group_size=n,
        min_matchmaking_time=args.matchmaking_time,
        request_timeout=min(3.0, args.matchmaking_time / 2),
    )
    (out / f"ready{i}").touch()
    barrier(out, "ready", n)
    setup_s = time.perf_counter() - t_setup
    mine = _descendants(os.getpid())
    seen: dict[str, int] = {}
    start_bytes = tcp_sent(mine)
    seen.update(start_bytes)

    snapshot = [p_.detach().clone() for p_ in params]
    records: list[dict] = []
    rounds: list[dict] = []
    t_start = time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        # 3. Inner step.
        x, y = sampler.batch(step)
        loss = model.loss(x, y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        rec = {"step": step, "train_loss": loss_value}
        # 4. Outer step every H inner steps.
        if step % H == 0:
            ts = time.perf_counter()
            with torch.no_grad(), averager.get_tensors() as bufs:
                for buf, s_, p_ in zip(bufs, snapshot, params):
                    buf.copy_(s_ - p_)  # Delta = theta_global - theta_local (DiLoCo's sign)
            ta = time.perf_counter()
            group = averager.step(weight=1.0, timeout=args.averaging_timeout)
            tb = time.perf_counter()
            with torch.no_grad(), averager.get_tensors() as bufs:
                for buf, s_, p_ in zip(bufs, snapshot, params):
                    p_.copy_(s_)
                    p_.grad = buf.clone()
            outer_opt.step()
            outer_opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for s_, p_ in zip(snapshot, params):
                    s_.copy_(p_)
            now = tcp_sent(mine)
            for k, v in now.items():
                seen[k] = max(seen.get(k, 0), v)
            rounds.append(
                {
                    "step": step,
                    "ok": group is not None,
                    "group_size": len(group) if group else 0,
                    "averager_step_s": tb - ta,  # matchmaking + all-reduce, waiting included
                    "outer_s": time.perf_counter() - ts,
                }
            )
            rec["sync_breakdown"] = {"averager_step": tb - ta}
        rec["step_time"] = time.perf_counter() - t0  # incl. the socket read at a sync (~ms)
        rec["wall_time"] = time.perf_counter() - t_start
        if step == steps or step % cfg.eval_every == 0:
            rec["eval_loss"] = evaluate(model, evals, device, nullcontext)
        records.append(rec)
    wall = time.perf_counter() - t_start

    # 5. Final count after every rank is done (no averaging traffic left in flight).
    (out / f"done{i}").touch()
    barrier(out, "done", n)
    for k, v in tcp_sent(mine).items():
        seen[k] = max(seen.get(k, 0), v)
    measured = sum(v - start_bytes.get(k, 0) for k, v in seen.items())
    numel = sum(p_.numel() for p_ in params)
    modelled = len(rounds) * 2 * (n - 1) * numel * 4 // n
    res = {
        "rank": i,
        "workers": n,
        "records": records,
        "rounds": rounds,
        "wall_time": wall,
        "setup_s": setup_s,
        "bytes_sent": measured,
        "bytes_sent_at_start": sum(start_bytes.values()),
        "bytes_modelled": modelled,
        "tcp_connections_seen": len(seen),
        "num_params": numel,
        "hivemind_version": hivemind.__version__,
    }
    tmp = out / f".hivemind_rank{i}.json"
    tmp.write_text(json.dumps(res))
    os.replace(tmp, out / f"hivemind_rank{i}.json")
    (out / f"written{i}").touch()
    barrier(out, "written", n)  # stay up until every peer has its last counts
    averager.shutdown()
    dht.shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
