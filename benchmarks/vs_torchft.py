"""Question: does lowband's DiLoCo match torchft's DiLoCo in loss, bytes and step time on CPU?

    python benchmarks/vs_torchft.py                        # 4 workers, 300 steps, H = 50
    python benchmarks/vs_torchft.py --repeats 2 --noise    # as in RESULTS.md (about 7 min)
    python benchmarks/vs_torchft.py --race --repeats 2     # on a busy shared machine
    python benchmarks/vs_torchft.py --workers 2 --steps 100 --plot-dir /tmp/vs_torchft

Runs one job twice, one after the other, on the same model preset, corpus, seed, worker count,
data (lowband's ShardSampler: every worker sees the same batches in both runs), inner optimizer
(AdamW, lowband's lr, betas 0.9/0.95, wd 0.1, clip 1.0, warmup + cosine) and outer optimizer
(Nesterov SGD, lr 0.7, momentum 0.9, fp32 outer gradients, every H steps):

  * lowband: `lowband train --algo diloco --bits 32` in a fresh process (benchmarks/_common.train);
  * torchft 0.2.0: benchmarks/_torchft_worker.py, one process per worker, each its own replica
    group with torchft's Manager + DiLoCo over a reconfigurable Gloo group, and a Lighthouse in a
    separate process.

Bytes are counted the same way on both sides: every collective's tensor sizes under lowband's
accounting model (lowband.comm.accounting; a ring all-reduce sends 2(n-1)/n of the tensor per
rank). lowband counts its own collectives; torchft's process group is wrapped and logs the tensors
of every collective it issues (see _torchft_worker.py). Control-plane gRPC (quorum, should_commit,
heartbeats) is not counted.

On a shared machine, load that comes and goes between the two sequential runs skews their
wall-clock times; two figures resist it: the jobs' CPU seconds (user + sys of all their
processes), and --race, which runs both jobs at the same time so that any other load slows both
alike (each then gets about half the machine, so absolute times double).

Step time is the time of a training step (batch, forward, backward, clip, inner step, outer step
when due), without evaluation and logging: lowband's compute_time + exposed comm_time per step
from its metrics, torchft's measured around the same code. "Steady state" is the mean over steps
[20% of steps, last step), averaged over workers, outer steps included.

Writes curves.json (eval and train loss curves, per-step times, bytes) into --out (a fresh
temporary folder by default), prints the comparison table and a markdown block for RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, train  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_torchft_worker.py"


# -- lowband ------------------------------------------------------------------------------------
def run_lowband(args, out: Path, seed: int) -> dict:
    flags = [
        "--algo", "diloco", "--bits", "32", "--workers", str(args.workers), "--device", "cpu",
        "--model", args.model, "--seed", str(seed), "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
        "--sync-every", str(args.sync_every), "--outer-lr", str(args.outer_lr),
        "--outer-momentum", str(args.outer_momentum), "--eval-every", str(args.eval_every),
        "--eval-batches", str(args.eval_batches), "--log-every", "1", "--ckpt-every", "-1",
    ]  # fmt: skip
    t0, cpu0 = time.perf_counter(), _children_cpu()
    train(out, flags)
    job_wall, job_cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    summary = json.loads((out / "summary.json").read_text())
    n = args.workers
    ranks, init = [], []
    for r in range(n):
        lines = [
            json.loads(x) for x in (out / "metrics" / f"rank{r}.jsonl").read_text().splitlines()
        ]
        # Communication before step 1 (the start-up check that all workers hold the same
        # parameters, or rank 0's broadcast) is in step 1's counters; with H > 1 step 1 itself
        # communicates nothing, so step 1's counters are the start-up's.
        assert lines[0]["step"] == 1 and args.sync_every > 1
        init.append(lines[0]["bytes_sent"])
        prev_comm, prev_compute = lines[0]["comm_time"], 0.0
        recs = []
        for m in lines:
            comm = m["comm_time"] - prev_comm  # exposed communication of this step
            compute = m["compute_time"] - prev_compute
            recs.append(
                {
                    "step": m["step"],
                    "train_loss": m["train_loss"],
                    "step_time": compute + comm,  # the step itself, without eval and logging
                    "comm_time": comm,
                }
            )
            prev_comm, prev_compute = m["comm_time"], m["compute_time"]
            if "eval_loss" in m:
                recs[-1]["eval_loss"] = m["eval_loss"]
        ranks.append(
            {"records": recs, "bytes_sent": lines[-1]["bytes_sent"], "wall": lines[-1]["wall_time"]}
        )
    num_params = json.loads((out / "meta.json").read_text()).get("model_params")
    return _common_view(
        ranks,
        init_bytes=init,
        loop_wall=summary["wall_time"],
        job_wall=job_wall,
        job_cpu=job_cpu,
        extra={"bytes_by_op_rank0": summary["bytes_by_op"], "num_params": num_params},
    )


# -- torchft ------------------------------------------------------------------------------------
def run_torchft(args, out: Path, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    n = args.workers
    t0, cpu0 = time.perf_counter(), _children_cpu()
    log = open(out / "lighthouse.log", "w")
    lighthouse = subprocess.Popen(
        [sys.executable, str(WORKER), "lighthouse", "--min-replicas", str(n)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
    )  # fmt: skip
    procs, logs = [], [log]
    try:
        address = lighthouse.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"the Lighthouse did not start; see {out / 'lighthouse.log'}")
        common = [
            "--workers", str(n), "--lighthouse", address, "--out", str(out),
            "--model", args.model, "--seed", str(seed), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--sync-every", str(args.sync_every), "--outer-lr", str(args.outer_lr),
            "--outer-momentum", str(args.outer_momentum), "--eval-every", str(args.eval_every),
            "--eval-batches", str(args.eval_batches),
        ] + (["--init-sync"] if args.torchft_init_sync else [])  # fmt: skip
        for i in range(n):
            err = open(out / f"worker{i}.log", "w")
            logs.append(err)
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), "--replica", str(i), *common],
                    stdout=err,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        deadline = time.time() + args.timeout
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.time() > deadline:
                bad = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
                tail = (out / f"worker{bad[0]}.log").read_text()[-3000:] if bad else "timeout"
                raise RuntimeError(f"torchft worker(s) {bad or 'all'} failed:\n{tail}")
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        lighthouse.stdin.close()
        try:
            lighthouse.wait(timeout=10)
        except subprocess.TimeoutExpired:
            lighthouse.kill()
        for f in logs:
            f.close()
    job_wall, job_cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    ranks = []
    for i in range(n):
        d = json.loads((out / f"torchft_rank{i}.json").read_text())
        ranks.append(
            {
                "records": d["records"],
                "bytes_sent": d["bytes_sent"],
                "wall": d["wall_time"],
                "raw": d,
            }
        )
    d0 = ranks[0]["raw"]
    return _common_view(
        ranks,
        init_bytes=[0] * n,  # init_sync=False: identical seeded init, nothing sent
        loop_wall=max(r["wall"] for r in ranks),
        job_wall=job_wall,
        job_cpu=job_cpu,
        extra={
            "calls_by_op_rank0": d0["calls_by_op"],
            "allreduce_numels": d0["allreduce_numels"],
            "allreduce_itemsizes": d0["allreduce_itemsizes"],
            "commits": d0["commits"],
            "pg_configures": d0["pg_configures"],
            "num_params": d0["num_params"],
        },
    )


# -- shared -------------------------------------------------------------------------------------
def _children_cpu() -> float:
    """User + system CPU seconds of all finished child processes (and theirs) so far.

    A job's CPU seconds hardly depend on what else the machine runs, unlike its wall time: the
    figure to compare when the machine is shared.
    """
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _common_view(ranks, *, init_bytes, loop_wall, job_wall, job_cpu, extra) -> dict:
    steps = [r["step"] for r in ranks[0]["records"]]
    train_curve = {
        s: statistics.fmean(r["records"][k]["train_loss"] for r in ranks)
        for k, s in enumerate(steps)
    }
    step_time = {
        s: statistics.fmean(r["records"][k]["step_time"] for r in ranks)
        for k, s in enumerate(steps)
    }
    evals = {r["step"]: r["eval_loss"] for r in ranks[0]["records"] if "eval_loss" in r}
    # Where outer steps spend their time, mean over workers: lowband's exposed communication
    # (comm_time) and torchft's wrapped calls (sync_breakdown), at the steps that have them.
    parts: dict[int, dict[str, float]] = {}
    for k, s in enumerate(steps):
        keys = set()
        for r in ranks:
            rec = r["records"][k]
            keys |= set(rec.get("sync_breakdown", {})) | (
                {"comm_time"} if "comm_time" in rec else set()
            )
        for key in keys:
            vals = [
                r["records"][k].get("sync_breakdown", {}).get(key, r["records"][k].get(key, 0.0))
                for r in ranks
            ]
            parts.setdefault(s, {})[key] = statistics.fmean(vals)
    sent = [r["bytes_sent"] for r in ranks]
    return {
        "evals": evals,
        "train": train_curve,
        "step_time": step_time,
        "parts": parts,
        "bytes_sent_per_worker": statistics.fmean(sent),
        "sync_bytes_per_worker": statistics.fmean(b - i for b, i in zip(sent, init_bytes)),
        "init_bytes_per_worker": statistics.fmean(init_bytes),
        "loop_wall": loop_wall,
        "job_wall": job_wall,
        "job_cpu": job_cpu,
        **extra,
    }


def steady(res: dict, steps: int, H: int) -> dict:
    """Mean step time over [20% of steps, last step), and split into inner and outer-step steps.

    The first outer step (step H) is reported on its own: torchft builds its cross-replica Gloo
    group there (first quorum), lowband built its group before training.
    """
    lo = math.ceil(0.2 * steps)
    window = [s for s in res["step_time"] if lo <= s < steps]
    outer = [res["step_time"][s] for s in window if s % H == 0 and s != H]
    inner = [res["step_time"][s] for s in window if s % H != 0]
    first_outer = res["step_time"].get(H)
    nan = float("nan")
    return {
        "mean": statistics.fmean(res["step_time"][s] for s in window),
        "median": statistics.median(res["step_time"][s] for s in window),
        "inner": statistics.fmean(inner) if inner else nan,
        "outer": statistics.fmean(outer) if outer else nan,
        "first_outer": first_outer if first_outer is not None else nan,
        "window": (lo, steps - 1),
    }


def _report(name: str, res: dict, steps: int, H: int) -> None:
    s = steady(res, steps, H)
    print(f"  {name}: {s['mean'] * 1e3:.1f} ms/step steady, job wall {res['job_wall']:.1f} s",
          flush=True)  # fmt: skip


def plot(ours: dict, theirs: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7), dpi=120)
    ax, dax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for res, name, colour in ((ours, "lowband", "C0"), (theirs, "torchft", "C3")):
        xs = sorted(res["train"])
        ax.plot(xs, [res["train"][s] for s in xs], color=colour, alpha=0.35, lw=0.8,
                label=f"{name} train (mean over workers)")  # fmt: skip
        es = sorted(res["evals"])
        ax.plot(es, [res["evals"][s] for s in es], color=colour, marker="o", lw=1.5,
                ls="-" if name == "lowband" else "--", label=f"{name} eval")  # fmt: skip
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    xs = sorted(set(ours["train"]) & set(theirs["train"]))
    dax.plot(xs, [ours["train"][s] - theirs["train"][s] for s in xs], color="C2", lw=0.8,
             label="train (mean over workers)")  # fmt: skip
    es = sorted(set(ours["evals"]) & set(theirs["evals"]))
    dax.plot(es, [ours["evals"][s] - theirs["evals"][s] for s in es], color="k", marker="o",
             lw=1.2, label="eval")  # fmt: skip
    dax.axhline(0, color="0.5", lw=0.6)
    dax.set_ylabel("lowband - torchft")
    dax.set_xlabel("step")
    dax.grid(alpha=0.3)
    dax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def add_task_args(p: argparse.ArgumentParser) -> None:
    """The task every side-by-side runs alike (vs_torchft.py, vs_hivemind.py)."""
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sync-every", type=int, default=50, help="H")
    p.add_argument("--model", default="1m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_task_args(p)
    p.add_argument("--order", choices=["lowband-first", "torchft-first"], default="lowband-first")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the pair this many times, alternating the order; step times are averaged",
    )
    p.add_argument(
        "--race",
        action="store_true",
        help="run the two jobs at the same time (each gets half the machine); use on a shared "
        "machine, where load that comes and goes between sequential runs skews their times",
    )
    p.add_argument(
        "--noise",
        action="store_true",
        help="also run lowband with seed+1: the seed-to-seed spread of the eval loss, for scale",
    )
    p.add_argument(
        "--torchft-init-sync",
        action="store_true",
        help="run torchft with its default init_sync=True instead of False (see docs/torchft.md)",
    )
    p.add_argument(
        "--out", default=None, help="folder for runs and curves.json (default: a temp dir)"
    )
    p.add_argument("--plot-dir", default=None, help="write vs_torchft.png here")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="vs_torchft-"))
    out.mkdir(parents=True, exist_ok=True)
    H = args.sync_every
    first = ["lowband", "torchft"] if args.order == "lowband-first" else ["torchft", "lowband"]
    reps: list[dict[str, dict]] = []
    for rep in range(args.repeats):
        res = {}
        if args.race:  # both jobs at once: whatever else runs on the machine slows both alike
            print(f"[{rep + 1}/{args.repeats}] running lowband and torchft at the same time "
                  f"({args.workers} workers each, {args.steps} steps) ...", flush=True)  # fmt: skip
            with concurrent.futures.ThreadPoolExecutor(2) as ex:
                futs = {
                    "lowband": ex.submit(run_lowband, args, out / f"lowband-{rep}", args.seed),
                    "torchft": ex.submit(run_torchft, args, out / f"torchft-{rep}", args.seed),
                }
                res = {name: f.result() for name, f in futs.items()}
            for name, r_ in res.items():  # CPU seconds of two overlapping jobs can't be told apart
                r_["job_cpu"] = float("nan")
                _report(name, r_, args.steps, H)
        else:
            order = first if rep % 2 == 0 else first[::-1]  # alternate: drift hits both alike
            for name in order:
                print(f"[{rep + 1}/{args.repeats}] running {name} ({args.workers} workers, "
                      f"{args.steps} steps) ...", flush=True)  # fmt: skip
                fn = run_lowband if name == "lowband" else run_torchft
                res[name] = fn(args, out / f"{name}-{rep}", args.seed)
                _report(name, res[name], args.steps, H)
        reps.append(res)
    noise = None
    if args.noise:
        print(f"running lowband with seed {args.seed + 1} (noise reference) ...", flush=True)
        noise = run_lowband(args, out / "lowband-seed+1", args.seed + 1)
    ours, theirs = reps[0]["lowband"], reps[0]["torchft"]
    for r in reps[1:]:  # the runs are deterministic: every repeat must give the same losses
        for name in ("lowband", "torchft"):
            if r[name]["evals"] != reps[0][name]["evals"]:
                print(f"note: {name}'s eval losses differ between repeats: "
                      f"{reps[0][name]['evals']} vs {r[name]['evals']}")  # fmt: skip
    # Step times: each statistic averaged over the repeats.
    sts = {n: [steady(r[n], args.steps, H) for r in reps] for n in ("lowband", "torchft")}
    avg = lambda xs, k: statistics.fmean(x[k] for x in xs)  # noqa: E731
    so = {k: avg(sts["lowband"], k) for k in ("mean", "median", "inner", "outer", "first_outer")}
    st = {k: avg(sts["torchft"], k) for k in ("mean", "median", "inner", "outer", "first_outer")}
    so["window"] = st["window"] = sts["lowband"][0]["window"]
    lw = {n: statistics.fmean(r[n]["loop_wall"] for r in reps) for n in ("lowband", "torchft")}

    def outer_parts(name: str) -> dict[str, float]:
        """Mean seconds per outer step of each part, over the repeats (steady window as above)."""
        lo = so["window"][0]
        acc: dict[str, list[float]] = {}
        for r in reps:
            for s_, d in r[name]["parts"].items():
                if int(s_) % H == 0 and int(s_) != H and lo <= int(s_) < args.steps:
                    for key, v in d.items():
                        acc.setdefault(key, []).append(v)
        return {k: statistics.fmean(v) for k, v in acc.items()}

    po, pt = outer_parts("lowband"), outer_parts("torchft")
    jw = {n: statistics.fmean(r[n]["job_wall"] for r in reps) for n in ("lowband", "torchft")}
    jc = {n: statistics.fmean(r[n]["job_cpu"] for r in reps) for n in ("lowband", "torchft")}

    eval_steps = sorted(set(ours["evals"]) & set(theirs["evals"]))
    final = max(eval_steps)
    d_final = ours["evals"][final] - theirs["evals"][final]
    rel_final = d_final / theirs["evals"][final]
    max_abs = max(abs(ours["evals"][s] - theirs["evals"][s]) for s in eval_steps)
    identical = all(ours["evals"][s] == theirs["evals"][s] for s in eval_steps)
    common_train = sorted(set(ours["train"]) & set(theirs["train"]))
    train_max = max(abs(ours["train"][s] - theirs["train"][s]) for s in common_train)

    mb = lambda b: f"{b / 1e6:.2f}"  # noqa: E731
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    rows = [
        ("eval loss " + ", ".join(f"@{s}" for s in eval_steps), *(
            " / ".join(f"{r['evals'][s]:.4f}" for s in eval_steps) for r in (ours, theirs))),
        (f"final eval loss (step {final})", f"{ours['evals'][final]:.4f}", f"{theirs['evals'][final]:.4f}"),
        ("final train loss (mean of workers)", f"{ours['train'][args.steps]:.4f}", f"{theirs['train'][args.steps]:.4f}"),
        ("MB sent per worker, outer steps", mb(ours["sync_bytes_per_worker"]), mb(theirs["sync_bytes_per_worker"])),
        ("MB sent per worker, before step 1 (start-up)", mb(ours["init_bytes_per_worker"]), mb(theirs["init_bytes_per_worker"])),
        ("MB sent per worker, total", mb(ours["bytes_sent_per_worker"]), mb(theirs["bytes_sent_per_worker"])),
        (f"ms/step, steady mean (steps {so['window'][0]}-{so['window'][1]})", ms(so["mean"]), ms(st["mean"])),
        ("ms/step, steady median", ms(so["median"]), ms(st["median"])),
        ("ms/step, inner steps only", ms(so["inner"]), ms(st["inner"])),
        ("ms/step, outer-step steps (after the first)", ms(so["outer"]), ms(st["outer"])),
        (f"ms, first outer step (step {H})", ms(so["first_outer"]), ms(st["first_outer"])),
        ("training loop wall (s, incl. evals)", f"{lw['lowband']:.1f}", f"{lw['torchft']:.1f}"),
        ("job wall (s, incl. start-up)", f"{jw['lowband']:.1f}", f"{jw['torchft']:.1f}"),
        ("job CPU seconds, all processes (user + sys)", f"{jc['lowband']:.1f}", f"{jc['torchft']:.1f}"),
    ]  # fmt: skip
    if math.isnan(jc["lowband"]):  # --race: the two jobs' CPU seconds cannot be told apart
        rows.pop()
    table = "| | lowband DiLoCo | torchft DiLoCo |\n|---|---|---|\n" + "".join(
        f"| {a} | {b} | {c} |\n" for a, b, c in rows
    )
    ratio = so["mean"] / st["mean"]
    per_rep = ", ".join(
        f"{a['mean'] / b['mean']:.3f}" for a, b in zip(sts["lowband"], sts["torchft"])
    )
    lines = [
        f"step time ratio lowband/torchft (steady mean): {ratio:.3f}"
        + (f" (per repeat: {per_rep})" if args.repeats > 1 else "")
        + f"; of medians: {so['median'] / st['median']:.3f}",
        f"final eval loss lowband - torchft: {d_final:+.2e} ({100 * rel_final:+.5f}%)",
        f"max |eval loss difference| over steps {eval_steps}: {max_abs:.2e}"
        + (" (bit-identical at every eval)" if identical else ""),
        f"max |train loss difference| (mean of workers, every step): {train_max:.2e}",
        f"torchft collectives per worker: {theirs['calls_by_op_rank0']}, tensor sizes "
        f"{theirs['allreduce_numels']}, bytes/element {theirs['allreduce_itemsizes']}, "
        f"commits {theirs['commits']}, process-group configures {theirs['pg_configures']}",
        f"lowband bytes by op (rank 0): {ours['bytes_by_op_rank0']}",
    ]
    if not math.isnan(jc["lowband"]):
        lines.insert(
            1,
            f"job CPU seconds ratio lowband/torchft: {jc['lowband'] / jc['torchft']:.3f}"
            + (
                " (per repeat: "
                + ", ".join(
                    f"{r['lowband']['job_cpu'] / r['torchft']['job_cpu']:.3f}" for r in reps
                )
                + ")"
                if args.repeats > 1
                else ""
            ),
        )
    if po and pt:
        rest_t = (
            pt.get("perform_sync", 0) - pt.get("should_commit", 0) - pt.get("outer_opt_step", 0)
        )
        lines.append(
            "outer step (mean, first excluded), ms: lowband exposed comm "
            f"{po.get('comm_time', 0) * 1e3:.1f} of {so['outer'] * 1e3:.1f}; torchft quorum "
            f"{pt.get('quorum', 0) * 1e3:.1f} + pseudo-grads and all-reduce issue "
            f"{pt.get('prepare_sync', 0) * 1e3:.1f} + all-reduce wait and parameter copies "
            f"{rest_t * 1e3:.1f} + should_commit {pt.get('should_commit', 0) * 1e3:.1f} + outer "
            f"SGD {pt.get('outer_opt_step', 0) * 1e3:.1f} of {st['outer'] * 1e3:.1f}"
        )
    if noise is not None:
        dn = noise["evals"][final] - ours["evals"][final]
        lines.append(
            f"noise reference: lowband seed {args.seed + 1} - seed {args.seed} final eval loss: "
            f"{dn:+.5f} ({100 * dn / ours['evals'][final]:+.3f}%)"
        )
    print()
    print(f"machine: {machine()}")
    print(table)
    print("\n".join(lines))

    curves = {
        "args": vars(args),
        "machine": machine(),
        "lowband": ours,
        "torchft": theirs,
        "repeats": [
            {n: {k: r[n][k] for k in ("step_time", "loop_wall", "job_wall", "job_cpu")} for n in r}
            for r in reps[1:]
        ],
        **({"lowband_seed+1": noise} if noise is not None else {}),
        "steady": {"lowband": so, "torchft": st},
    }
    (out / "curves.json").write_text(json.dumps(curves, indent=1, default=str))
    print(f"\ncurves: {out / 'curves.json'}")
    if args.plot_dir:
        pd = Path(args.plot_dir)
        pd.mkdir(parents=True, exist_ok=True)
        plot(ours, theirs, pd / "vs_torchft.png",
             f"DiLoCo, {args.model}, {args.workers} workers, H={H}: lowband vs torchft")  # fmt: skip
        print(f"plot: {pd / 'vs_torchft.png'}")

    command = "python benchmarks/vs_torchft.py " + shlex.join(sys.argv[1:])
    block = (
        f"\n## DiLoCo side by side with torchft, {args.model} on cpu\n\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"- machine: {machine()}\n"
        f"- command: `{command.strip()}`\n\n{table}\n" + "\n".join(f"- {x}" for x in lines) + "\n"
    )
    print("\n----- markdown block for benchmarks/RESULTS.md -----")
    print(block)


if __name__ == "__main__":
    main()
