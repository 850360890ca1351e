"""Which gossip method trains best at equal tokens, and at equal bytes: D-PSGD vs DFedSAM vs
DFedSAM-MGS on a ring and an exponential graph, against NoLoCo and DiLoCo (docs/decentralized.md).

Every run is `lowband train` on the 1m model with the same workers, steps and batch, so all see the
same tokens. Reported per run: rank 0's final eval loss, the mean eval loss over all workers' final
models (from the last checkpoint, on the run's own held-out split), the consensus distance
sqrt(mean_i ||x_i - x_bar||^2) / ||x_bar|| at every checkpoint, the bytes each worker sent, and for
the graph methods the bytes per edge (edge_bytes events).

`--set tokens` (the default): every method with one round every H = --sync-every steps (DFedSAM-MGS
then sends Q times D-PSGD's bytes). `--set bytes`: the same bytes per edge, on each graph
  * D-PSGD, H                       one gossip exchange per edge every H steps;
  * DFedSAM (Q = 1, rho > 0), H     the same everything but SAM: SAM's share alone;
  * DFedSAM-MGS (Q), Q H            Q exchanges every Q H steps: the same bytes, Q x fewer rounds,
and at D-PSGD-ring's bytes per worker NoLoCo with H / 2 (one partner per round, not two) and
DiLoCo with H. `--set all`: both. `--partition by-source` is passed to every run.

    python benchmarks/decentralized.py --workers 8 --steps 120 --sync-every 10
    python benchmarks/decentralized.py --partition by-source --set all

`--convex`: DADAO (lowband.decentral.dadao, uniform and resistance rates) against synchronous
D-PSGD with gradient tracking (DIGing: x <- W x - a y; y <- W y + g(x_new) - g(x)) on distributed
ridge regression (8 nodes, heterogeneous targets), ring and erdos:0.4: edge activations (one
vector each way on one edge) and gradients until the mean squared distance to the optimum is
below 1e-6 of ||x*||^2. DIGing's step is the best of a grid (its best case). Both rate kinds at
uniform's total (resistance rates now default to their own smaller total). The multi-process
runs, SDP rates and an ill-conditioned problem are in benchmarks/dadao.py.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import train  # noqa: E402

from lowband.data import eval_batches, load_corpus  # noqa: E402
from lowband.data.partition import split_heldout  # noqa: E402
from lowband.models import build_model  # noqa: E402


def _events(run: Path, kind: str, rank: int) -> list[dict]:
    lines = (run / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in state.values()])


def consensus(run: Path, workers: int) -> list[tuple[int, float, list[dict]]]:
    """(step, relative consensus distance, every rank's model state) per checkpoint."""
    out = []
    for ckpt in sorted((run / "ckpt").glob("step_*")):
        states = [
            torch.load(ckpt / f"rank{r}.pt", map_location="cpu", weights_only=False)["model"]
            for r in range(workers)
        ]
        X = torch.stack([_flat(s) for s in states])
        mean = X.mean(0)
        dist = float(((X - mean) ** 2).sum(1).mean().sqrt() / mean.norm())
        out.append((int(ckpt.name.split("_")[1]), dist, states))
    return out


def mean_eval(states: list[dict], args) -> float:
    """The mean over workers of each final model's eval loss (same batches as the run's: the
    tail under iid, the global held-out documents under by-source or dirichlet)."""
    corpus = load_corpus("stdlib")
    _, eval_tokens = split_heldout(corpus, args.partition)
    evals = eval_batches(eval_tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                         num_batches=args.eval_batches)  # fmt: skip
    model = build_model("1m", vocab_size=corpus.vocab_size, seed=0)
    losses = []
    with torch.no_grad():
        for s in states:
            model.load_state_dict(s)
            losses.append(sum(float(model.loss(x.long(), y.long())) for x, y in evals) / len(evals))
    return sum(losses) / len(losses)


def _ridge(n: int, d: int = 4, m: int = 12, reg: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    H, c = [], []
    for i in range(n):
        A = torch.randn(m, d, generator=g, dtype=torch.float64)
        b = A @ torch.full((d,), float(i), dtype=torch.float64)
        b += 0.1 * torch.randn(m, generator=g, dtype=torch.float64)
        H.append(2 / m * A.T @ A + reg * torch.eye(d, dtype=torch.float64))
        c.append(2 / m * A.T @ b)
    mu = min(float(torch.linalg.eigvalsh(h)[0]) for h in H)
    L = max(float(torch.linalg.eigvalsh(h)[-1]) for h in H)
    return H, c, mu, L, torch.linalg.solve(sum(H), sum(c))


def convex(n: int = 8, precision: float = 1e-6, reg: float = 0.5) -> None:
    from lowband.decentral import parse_topology
    from lowband.decentral.dadao import gossip_rates, simulate, undirected_edges

    H, c, mu, L, x_star = _ridge(n, reg=reg)
    d, target = x_star.numel(), precision * float(x_star.square().sum())
    t_max = 150.0 * math.sqrt(L / mu) * 2  # enough for 1e-6 at rate ~ sqrt(mu/L)
    grad = lambda i, x: H[i] @ x - c[i]  # noqa: E731
    rows = []
    for spec in ("ring", "erdos:0.4"):
        topo = parse_topology(spec, n, seed=0)
        n_edges = len(undirected_edges(topo))
        same_total = sum(gossip_rates(topo, "uniform"))  # as recorded on 2026-12-02 01:24
        for kind in ("uniform", "resistance"):
            grads, calls, hit = [0], [0], [None]

            def g_counted(i, x, grads=grads):
                grads[0] += 1
                return grad(i, x)

            def record(t, states, grads=grads, calls=calls, hit=hit):
                calls[0] += 1  # a gossip event is played at both ends: two calls
                if hit[0] is None:
                    err = float(sum((s.x - x_star).square().sum() for s in states)) / n
                    if err < target:
                        hit[0] = (grads[0], (calls[0] - grads[0]) // 2, t)

            simulate(topo, g_counted, torch.zeros(d, dtype=torch.float64), mu, L, t_max=t_max,
                     rates=gossip_rates(topo, kind, total=same_total), record=record)  # fmt: skip
            rows.append((spec, f"DADAO {kind} rates", hit[0]))
        # DIGing on Metropolis W, best step of a grid
        W = topo.W
        best = None
        for a in (0.05, 0.1, 0.2, 0.3, 0.5):
            step = a / L
            X = torch.zeros(n, d, dtype=torch.float64)
            G = torch.stack([grad(i, X[i]) for i in range(n)])
            Y = G.clone()
            for k in range(1, 100001):
                X_new = W @ X - step * Y
                G_new = torch.stack([grad(i, X_new[i]) for i in range(n)])
                Y = W @ Y + G_new - G
                X, G = X_new, G_new
                if not torch.isfinite(X).all():
                    break
                if float((X - x_star).square().sum()) / n < target:
                    if best is None or k < best[0]:
                        best = (k, a)
                    break
        if best is not None:
            k, a = best
            rows.append((spec, f"D-PSGD + gradient tracking (step {a}/L)",
                         (n * k, 2 * n_edges * k, float(k))))  # fmt: skip
        else:
            rows.append((spec, "D-PSGD + gradient tracking", None))
    print(
        f"| graph | method | gradients | edge activations | time / iterations |  (mu {mu:.3f}, L {L:.3f})"
    )
    print("|---|---|---|---|---|")
    for spec, method, hit in rows:
        if hit is None:
            print(f"| {spec} | {method} | not reached | | |")
        else:
            print(f"| {spec} | {method} | {hit[0]:,} | {hit[1]:,} | {hit[2]:.0f} |")


def runs(args) -> dict[str, tuple[int, list[str]]]:
    """label -> (H, the run's own flags) for --set (module docstring)."""
    h, q = args.sync_every, args.gossip_steps
    tokens, same_bytes = {}, {}
    for graph in ("ring", "exponential"):
        topo = ["--topology", graph]
        dpsgd = (f"dpsgd {graph} H={h}", (h, ["--algo", "dpsgd", *topo]))
        tokens.update([dpsgd])
        tokens[f"dfedsam-mgs {graph} Q={q} H={h}"] = (
            h, ["--algo", "dfedsam-mgs", *topo, "--gossip-steps", str(q)],
        )  # fmt: skip
        same_bytes.update([dpsgd])
        same_bytes[f"dfedsam {graph} Q=1 H={h}"] = (h, ["--algo", "dfedsam", *topo])
        same_bytes[f"dfedsam-mgs {graph} Q={q} H={q * h}"] = (
            q * h, ["--algo", "dfedsam-mgs", *topo, "--gossip-steps", str(q)],
        )  # fmt: skip
    tokens[f"noloco g=2 H={h}"] = (h, ["--algo", "noloco"])
    tokens[f"diloco H={h}"] = (h, ["--algo", "diloco"])
    same_bytes[f"noloco g=2 H={h // 2}"] = (h // 2, ["--algo", "noloco"])
    same_bytes[f"diloco H={h}"] = (h, ["--algo", "diloco"])
    return {"tokens": tokens, "bytes": same_bytes, "all": {**tokens, **same_bytes}}[args.set]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--sync-every", type=int, default=10, help="H (K) of every run in --set tokens")
    p.add_argument("--gossip-steps", type=int, default=4, help="Q of DFedSAM-MGS")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--partition", default="iid", help="passed to every run: iid, by-source, ...")
    p.add_argument("--set", choices=("tokens", "bytes", "all"), default="tokens",
                   help="equal tokens (one H), equal bytes per edge, or both")  # fmt: skip
    p.add_argument("--out", default=None)
    p.add_argument("--convex", action="store_true", help="DADAO vs gradient tracking (ridge)")
    p.add_argument("--reg", type=float, default=0.5, help="--convex: the ridge penalty")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.convex:
        convex(reg=args.reg)
        print("command: python benchmarks/decentralized.py " + shlex.join(sys.argv[1:]))
        return
    root = Path(args.out or tempfile.mkdtemp(prefix="decentral-"))
    common = [
        "--workers", str(args.workers), "--steps", str(args.steps), "--batch-size",
        str(args.batch_size), "--seq-len", str(args.seq_len), "--eval-batches",
        str(args.eval_batches), "--eval-every", str(args.steps), "--ckpt-every",
        str(args.steps // 3), "--keep-checkpoints", "10", "--threads", "1",
        "--partition", args.partition,
    ]  # fmt: skip
    rows = []
    for label, (h, flags) in runs(args).items():
        t0 = time.perf_counter()
        name = label.replace(" ", "_").replace("=", "")
        run = train(root / name, [*common, "--sync-every", str(h), *flags])
        summary = json.loads((run / "summary.json").read_text())
        cons = consensus(run, args.workers)
        edge = [b for r in range(args.workers) for e in _events(run, "edge_bytes", r)
                for b in e["sent_to"].values()]  # fmt: skip
        gap = _events(run, "topology", 0)
        rows.append(
            {
                "run": label,
                "eval_rank0": summary["final_eval_loss"],
                "eval_mean": mean_eval(cons[-1][2], args),
                "consensus": [(s, d) for s, d, _ in cons],
                "mb_per_worker": summary["bytes_sent_per_worker"] / 1e6,
                "mb_per_edge": (sum(edge) / len(edge) / 1e6) if edge else None,
                "gap": gap[0]["spectral_gap"] if gap else None,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print("| run | spectral gap | eval loss (rank 0) | eval loss (mean of workers) | consensus distance "
          "(by step) | MB sent per worker | MB per directed edge | run s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cons = " / ".join(f"{d:.2e}" for _, d in r["consensus"])
        gap = f"{r['gap']:.3f}" if r["gap"] is not None else "-"
        edge = f"{r['mb_per_edge']:.1f}" if r["mb_per_edge"] is not None else "-"
        print(f"| {r['run']} | {gap} | {r['eval_rank0']:.4f} | {r['eval_mean']:.4f} | {cons} | "
              f"{r['mb_per_worker']:.1f} | {edge} | {r['seconds']:.0f} |")  # fmt: skip
    print("consensus at steps " + ", ".join(str(s) for s, _ in rows[0]["consensus"]))
    print("command: python benchmarks/decentralized.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
