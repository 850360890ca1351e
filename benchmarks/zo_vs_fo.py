"""ZO fine-tuning (one byte per worker per step) vs first-order fine-tuning from the same checkpoint.

One question: starting from one lowband-pretrained checkpoint, how does the loss of shared-seed
zeroth-order fine-tuning (`lowband finetune`, 2 workers, --bits 8) compare with first-order
fine-tuning (DDP + AdamW, 2 workers) over the same steps and batches, and how many bytes does each
send per step?

  1. pretrain: `lowband train` (DDP, 2 workers) on --pretrain-data (default: stdlib source).
  2. ZO:  `lowband finetune --init PRETRAINED --workers 2 --bits 8` on --data.
  3. FO:  the same init, batches (ShardSampler, same seed) and steps; DDP all-reduce of the fp32
          gradients (lowband.algorithms.DDP), AdamW at a constant small lr (the pretraining's final
          cosine lr, 3e-4), no weight decay, gradient clipping 1.0. It runs as 2 threads with Gloo
          (run_ranks) and writes a run folder in the same format, so `lowband report` shows both.
Bytes are lowband's exact accounting (ring all-gather / all-reduce), per worker per step.

    python benchmarks/zo_vs_fo.py --data /usr/share/vim/vim90/doc/options.txt --append
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contextlib import nullcontext  # noqa: E402

from benchmarks._common import ROOT, append_results, train  # noqa: E402
from lowband.algorithms.ddp import DDP  # noqa: E402
from lowband.comm import Comm  # noqa: E402
from lowband.data import ShardSampler, eval_batches, load_corpus, split_eval  # noqa: E402
from lowband.report import write_report  # noqa: E402
from lowband.testing import run_ranks  # noqa: E402
from lowband.train.loop import MetricsWriter, evaluate  # noqa: E402
from lowband.train.rundir import RunDir, write_json_atomic  # noqa: E402
from lowband.zo.models import build_for_finetune  # noqa: E402


def finetune_zo(out: Path, init: Path, args) -> Path:
    flags = [
        "--init", str(init), "--data", args.data, "--workers", str(args.workers), "--bits", "8",
        "--steps", str(args.steps), "--lr", str(args.zo_lr), "--eps", str(args.zo_eps),
        "--seed", str(args.seed), "--eval-every", str(args.eval_every), "--ckpt-every", "-1",
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "lowband.cli", "finetune", "--out", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return out


def _fo_worker(comm: Comm, out: Path, init: Path, args) -> None:
    torch.set_num_threads(1)
    corpus = load_corpus(args.data)
    train_tokens, eval_tokens = split_eval(corpus)
    model = build_for_finetune("1m", corpus.vocab_size, args.seed, "cpu", str(init))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.fo_lr, betas=(0.9, 0.95), weight_decay=0)
    ddp = DDP(model, opt, comm)
    sampler = ShardSampler(
        train_tokens,
        rank=comm.rank,
        world_size=comm.size,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    evals = eval_batches(
        eval_tokens, batch_size=args.batch_size, seq_len=args.seq_len, num_batches=8
    )
    run = RunDir(out)
    metrics = MetricsWriter(run.metrics_path(comm.rank))
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = sampler.batch(step)
        loss = model.loss(x, y)
        loss.backward()
        ddp.sync_gradients()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ddp.step()
        rec = {
            "step": step,
            "tokens": step * args.batch_size * args.seq_len * comm.size,
            "train_loss": loss.item(),
            "lr": args.fo_lr,
            "bytes_sent": comm.stats.bytes_sent,
            "bytes_recv": comm.stats.bytes_recv,
            "compute_time": 0.0,
            "comm_time": comm.stats.seconds,
            "wall_time": time.perf_counter() - t0,
            "rank": comm.rank,
        }
        if step % args.eval_every == 0 or step == args.steps:
            rec["eval_loss"] = evaluate(model, evals, torch.device("cpu"), nullcontext)
        if step % 5 == 0 or "eval_loss" in rec:
            metrics.write(rec)
    metrics.close()


def finetune_fo(out: Path, init: Path, args) -> Path:
    run = RunDir(out)
    cfg = {
        "algo": "ddp (AdamW fine-tune)", "model": "1m", "workers": args.workers, "link": None,
        "lr": args.fo_lr, "init": str(init), "data": args.data, "steps": args.steps,
    }  # fmt: skip
    run.check_new()
    run.metrics_dir.mkdir(parents=True)
    write_json_atomic(run.config_path, cfg)
    run_ranks(args.workers, _fo_worker, out, init, args, timeout_s=3600)
    last = _lines(out)[-1]
    summary = {
        "final_eval_loss": last["eval_loss"], "steps": args.steps, "tokens": last["tokens"],
        "bytes_sent_per_worker": last["bytes_sent"], "world_size": args.workers,
    }  # fmt: skip
    write_json_atomic(run.summary_path, summary)
    return out


def start_loss(init: Path, args) -> float:
    corpus = load_corpus(args.data)
    model = build_for_finetune("1m", corpus.vocab_size, 0, "cpu", str(init))
    evals = eval_batches(
        split_eval(corpus)[1], batch_size=args.batch_size, seq_len=args.seq_len, num_batches=8
    )
    return evaluate(model, evals, torch.device("cpu"), nullcontext)


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics" / "rank0.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=time.strftime("runs/zo_vs_fo-%Y%m%d-%H%M%S"))
    p.add_argument("--pretrained", help="reuse this pretraining run instead of step 1")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--pretrain-data", default="stdlib")
    p.add_argument("--data", default="stdlib", help="fine-tuning corpus")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=1, help="fine-tuning data order and ZO seeds")
    p.add_argument("--zo-lr", type=float, default=3e-4)
    p.add_argument("--zo-eps", type=float, default=1e-3)
    p.add_argument("--fo-lr", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.pretrained:
        pre = Path(args.pretrained)
    else:
        pre = train(
            root / "pretrain",
            ["--workers", "2", "--steps", str(args.pretrain_steps), "--data", args.pretrain_data,
             "--ckpt-every", "0", "--eval-every", "100"],
        )  # fmt: skip
    loss0 = start_loss(pre, args)
    zo = finetune_zo(root / "zo", pre, args)
    fo = finetune_fo(root / "fo", pre, args)
    report = write_report([zo, fo], root / "report", title="ZO (1 byte) vs first-order fine-tuning")

    zl, fl = _lines(zo), _lines(fo)
    zev = {m["step"]: m["eval_loss"] for m in zl if "eval_loss" in m}
    fev = {m["step"]: m["eval_loss"] for m in fl if "eval_loss" in m}
    zb, fb = zl[-1]["bytes_sent"] / args.steps, fl[-1]["bytes_sent"] / args.steps
    rows = [f"| 0 (pretrained) | {loss0:.4f} | {loss0:.4f} |"]
    rows += [f"| {s} | {zev[s]:.4f} | {fev[s]:.4f} |" for s in sorted(zev) if s in fev]
    table = (
        "| step | ZO eval loss | FO eval loss |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "| | ZO (--bits 8) | FO (DDP fp32) | FO / ZO |\n|---|---|---|---|\n"
        f"| bytes sent per worker per step | {zb:,.2f} | {fb:,.0f} | {fb / zb:,.0f}x |"
    )
    print(table)
    print(f"report: {report}")
    if args.append:
        append_results(
            f"ZO vs first-order fine-tuning (1m, {args.workers} workers, {args.steps} steps)",
            "python " + shlex.join(["benchmarks/zo_vs_fo.py", *sys.argv[1:]]),
            table,
        )


if __name__ == "__main__":
    main()
