"""`lowband dadao`: DADAO on a strongly convex problem, one process per node (docs/decentralized.md).

DADAO is not an `--algo` of `lowband train`: it replaces the optimizer, needs mu and L, and its
guarantees (and the figures a reader compares with the paper's) are about distance to the optimum
of a smooth strongly convex sum, not a language model's loss. So it has its own command, shaped
like the paper's experiments:

1. The parent checks the options, builds the graph, solves the gossip rates (`--gossip-rates
   sdp|uniform|resistance`) once and writes them to RUN/graph.json with chi1, chi2 and the total
   rate; nothing is written before the checks pass (ConfigError, one line, exit 2).
2. `--workers` processes (lowband.launch.local: Gloo, 127.0.0.1) each rebuild the same problem
   from the seed, read the rates, and play their own node's events (lowband.decentral.dadao.
   DADAONode) with point-to-point messages on their edges only, through the emulated `--link` or
   `--link-map` (a pair's own link), under `--runtime rendezvous` (exact) or `mailbox` (never
   waits for a neighbour), optionally on a real-time clock (`--pace`); each writes RUN/nodes/rankR.json: x_i at every
   `--record-every` time units, its gradient and gossip counts, bytes per neighbour, dropped edges.
3. The parent joins them into RUN/trace.jsonl (per recorded time: mean_i ||x_i - x*||^2 / ||x*||^2,
   consensus distance, gradients, edge activations, bytes), RUN/summary.json (when the error
   first fell below `--precision`, with how many gradients and communications; bytes per edge)
   and RUN/convergence.png (error and consensus against time and against edge activations).

The time axis is DADAO's virtual Poisson time (gradient clocks of rate `--grad-rate`): events are
played as fast as the processes and links allow, and wall-clock seconds are reported beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowband.errors import ConfigError, RunDirError

RANGES = {
    "workers": (2, 256), "seed": (0, 2**63 - 1), "time": (1e-3, 1e6), "grad_rate": (1e-6, 1e6),
    "total_rate": (1e-9, 1e9), "dim": (1, 10**5), "samples": (1, 10**6), "reg": (1e-12, 1e6),
    "condition": (1.0, 1e12), "record_every": (1e-3, 1e6), "precision": (1e-300, 1.0),
    "threads": (1, 1024), "pace": (0.0, 10.0),
}  # fmt: skip


@dataclass(kw_only=True)
class DADAOConfig:
    """Everything that decides what `lowband dadao` computes. Saved as config.json in the run folder."""

    problem: str = "ridge"
    """The strongly convex problem: ridge or logistic (regression), heterogeneous across workers (lowband.decentral.problems)."""
    workers: int = 8
    """Nodes of the graph, one local process each."""
    topology: str = "ring"
    """The graph, as for `lowband train`: ring, torus, exponential, complete, erdos:P or FILE.json (undirected)."""
    gossip_rates: str = "sdp"
    """Per-edge gossip rates: sdp (the rates minimising the total rate under DADAO's condition 2 chi1 chi2 <= 1; needs cvxpy), uniform, or resistance (proportional to edge resistance)."""
    total_rate: float | None = None
    """Sum of the edge rates (default: the smallest that meets 2 chi1 chi2 <= 1 for the chosen direction)."""
    grad_rate: float = 1.0
    """Rate of every node's Poisson gradient clock (gradients per unit of time)."""
    time: float = 200.0
    """How long to run, in DADAO's Poisson time units."""
    seed: int = 0
    """Seed of the data, of an erdos graph and of every Poisson clock."""
    dim: int = 4
    """Dimension of x."""
    samples: int = 12
    """Samples per worker."""
    reg: float = 0.5
    """The ridge (l2) penalty; for logistic it is mu."""
    condition: float = 1.0
    """Spread of the feature scales: L/mu grows about as this (1: isotropic features)."""
    record_every: float = 1.0
    """Record every node's x every this many time units (trace.jsonl)."""
    precision: float = 1e-6
    """The summary reports when mean_i ||x_i - x*||^2 / ||x*||^2 first fell below this."""
    link: str | None = None
    """Emulated link on every edge, as for `lowband train` (e.g. 100mbit:20ms)."""
    link_map: str | None = None
    """A JSON file with a link per pair of workers, as for `lowband train --link-map`."""
    threads: int = 1
    """CPU threads per process."""
    runtime: str = "rendezvous"
    """rendezvous (each gossip event waits for the neighbour: bit-identical to the single-process reference) or mailbox (never waits: a slow node slows only itself; not reproducible)."""
    pace: float = 0.0
    """Wall seconds per unit of Poisson time: events are played on a real-time clock (0: as fast as each node can; mailbox needs a pace well above the message latency)."""
    straggler: str | None = None
    """RANK:SECONDS: that node sleeps SECONDS at each gradient (a slow worker, for experiments)."""

    device = "cpu"  # not a field: lowband.launch.local asks; DADAO's vectors are tiny

    def to_dict(self) -> dict:
        return {"algo": "dadao", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> DADAOConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def build_problem(self):
        from lowband.decentral.problems import make_problem

        return make_problem(self.problem, self.workers, self.dim, self.samples, self.reg,
                            self.condition, self.seed)  # fmt: skip


def validate(cfg: DADAOConfig):
    """Every check before anything is written; returns (topology, rates, problem)."""
    from lowband.comm import LinkMap, resolve_link
    from lowband.config import check_ranges
    from lowband.decentral import parse_topology
    from lowband.decentral.dadao import RUNTIMES
    from lowband.decentral.rates import gossip_rates

    check_ranges(cfg, RANGES)
    if cfg.runtime not in RUNTIMES:
        raise ConfigError(f"unknown --runtime {cfg.runtime!r}; choose {' or '.join(RUNTIMES)}")
    straggler(cfg)
    if cfg.time / cfg.record_every > 1e6:
        raise ConfigError("--time / --record-every must be at most 1e6 records")
    links = resolve_link(cfg.link, cfg.link_map)
    if isinstance(links, LinkMap):
        links.check(cfg.workers)
    topo = parse_topology(cfg.topology, cfg.workers, cfg.seed)
    if topo.directed:
        raise ConfigError(f"--topology {cfg.topology}: DADAO gossips on undirected edges")
    problem = cfg.build_problem()
    rates = gossip_rates(topo, cfg.gossip_rates, cfg.total_rate)
    return topo, rates, problem


def straggler(cfg: DADAOConfig) -> tuple[int, float] | None:
    """--straggler RANK:SECONDS, checked."""
    if cfg.straggler is None:
        return None
    try:
        rank, seconds = cfg.straggler.split(":")
        rank, seconds = int(rank), float(seconds)
    except ValueError:
        raise ConfigError(f"--straggler {cfg.straggler!r}: expected RANK:SECONDS") from None
    if not 0 <= rank < cfg.workers or not 0 <= seconds <= 10:
        raise ConfigError(
            f"--straggler {cfg.straggler!r}: rank in [0, --workers), seconds in [0, 10]"
        )
    return rank, seconds


def dadao_worker(cfg: DADAOConfig, comm, run, device, resume: bool = False) -> None:
    """One node (step 2 of the module docstring), in its own process."""
    from lowband.decentral import parse_topology
    from lowband.decentral.dadao import DADAONode

    torch.set_num_threads(cfg.threads)
    problem = cfg.build_problem()
    graph = json.loads((run.path / "graph.json").read_text())
    topo = parse_topology(cfg.topology, comm.size, cfg.seed)
    x0 = torch.zeros(problem.dim, dtype=torch.float64)
    grad, slow = problem.grad, straggler(cfg)
    if slow is not None and slow[0] == comm.rank:

        def grad(i, x):
            time.sleep(slow[1])
            return problem.grad(i, x)

    node = DADAONode(comm, topo, grad, x0, problem.mu, problem.L, cfg.time, seed=cfg.seed,
                     rates=graph["rates"], grad_rate=cfg.grad_rate, mode=cfg.runtime,
                     pace=cfg.pace)  # fmt: skip
    marks = [k * cfg.record_every for k in range(int(cfg.time / cfg.record_every) + 1)]
    with comm.stats.setup():  # one agreed start (Poisson time 0), so paced clocks line up
        start = torch.tensor([time.time()], dtype=torch.float64)
        comm.all_reduce(start, op="max")
    node.run(checkpoints=marks, start=float(start) + 0.05)
    out = {
        "rank": comm.rank,
        "seconds": node.seconds,
        "drain_seconds": node.drain_seconds,
        "gradients": node.gradients,
        "gradients_skipped": node.skipped,
        "updates_late": node.late,
        "mean_delay": node.late_time / max(node.late, 1),
        "messages_to": {str(j): m for j, m in sorted(node.messages_to.items())},
        "messages_from": {str(j): m for j, m in sorted(node.messages_from.items())},
        "comm_bytes": {  # what lowband.comm counted (and charged to the link), for the tests
            op: comm.stats.ops[op].bytes_sent + comm.stats.ops[op].bytes_recv
            for op in ("send", "recv")
            if op in comm.stats.ops
        },
        "gossips": node.gossips,
        "dropped": sorted(node.dropped),
        "sent_to": {str(j): b for j, b in sorted(node.bytes_to.items())},
        "trace": [[t, x.tolist(), g, q] for t, x, g, q in node.trace],
    }
    (run.path / "nodes").mkdir(exist_ok=True)
    (run.path / "nodes" / f"rank{comm.rank}.json").write_text(json.dumps(out))


def summarise(run: Path, cfg: DADAOConfig, problem) -> dict:
    """Step 3: trace.jsonl and summary.json from the nodes' files."""
    nodes = [json.loads((run / "nodes" / f"rank{r}.json").read_text()) for r in range(cfg.workers)]
    norm = float(problem.x_star.square().sum())
    rows, hit = [], None
    for k in range(min(len(n["trace"]) for n in nodes)):
        X = torch.tensor([n["trace"][k][1] for n in nodes], dtype=torch.float64)
        row = {
            "t": nodes[0]["trace"][k][0],
            "error": problem.error(X),
            "consensus": float((X - X.mean(0)).square().sum(1).mean()) / norm,
            "gradients": sum(n["trace"][k][2] for n in nodes),
            "edge_activations": sum(n["trace"][k][3] for n in nodes) // 2,
        }
        row["bytes"] = 2 * row["edge_activations"] * problem.dim * 8  # both ways, fp64
        rows.append(row)
        if hit is None and row["error"] < cfg.precision:
            hit = row
    with open(run / "trace.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    summary = {
        "problem": problem.name,
        "runtime": cfg.runtime,
        "mu": problem.mu,
        "L": problem.L,
        "final_error": rows[-1]["error"] if rows else None,
        "precision": cfg.precision,
        "reached": hit,
        "gradients": sum(n["gradients"] for n in nodes),
        "edge_activations": sum(n["gossips"] for n in nodes) // 2,
        "bytes_sent": sum(sum(n["sent_to"].values()) for n in nodes),
        "dropped_edges": sorted(
            {tuple(sorted((n["rank"], d))) for n in nodes for d in n["dropped"]}
        ),
        "seconds_per_node": [n["seconds"] for n in nodes],
        "drain_seconds_per_node": [n["drain_seconds"] for n in nodes],
        "gradients_skipped": sum(n["gradients_skipped"] for n in nodes),
        "updates_late": sum(n["updates_late"] for n in nodes),
        "edge_bytes": {str(n["rank"]): n["sent_to"] for n in nodes},
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    if rows:
        plot_convergence(rows, cfg, run / "convergence.png")
    return summary


def plot_convergence(rows: list[dict], cfg: DADAOConfig, path: Path) -> None:
    """Error and consensus distance against time and against edge activations (log scale)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), dpi=110, layout="constrained")
    for ax, x, label in zip(fig.subplots(1, 2), ("t", "edge_activations"),
                            ("time (Poisson units)", "edge activations")):  # fmt: skip
        pts = [(r[x], r["error"], r["consensus"]) for r in rows if r["error"] > 0]
        ax.semilogy(
            [p[0] for p in pts], [p[1] for p in pts], label="mean ||x_i - x*||^2 / ||x*||^2"
        )
        ax.semilogy([p[0] for p in pts if p[2] > 0], [p[2] for p in pts if p[2] > 0],
                    label="consensus distance", ls="--")  # fmt: skip
        ax.axhline(cfg.precision, color="grey", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"DADAO, {cfg.problem}, {cfg.topology}, {cfg.workers} nodes, "
                 f"{cfg.gossip_rates} rates", fontsize=10)  # fmt: skip
    fig.savefig(path)


def cmd_dadao(args: argparse.Namespace) -> int:
    from lowband.decentral.rates import chi1, laplacian, resistances, undirected_edges
    from lowband.launch.local import launch_local
    from lowband.train.rundir import RunDir

    names = {f.name for f in dataclasses.fields(DADAOConfig)}
    cfg = DADAOConfig(**{k: v for k, v in vars(args).items() if k in names})
    topo, rates, problem = validate(cfg)
    run = Path(args.out or f"runs/dadao-{cfg.problem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run.exists() and any(run.iterdir()):
        raise RunDirError(f"--out {run} is not empty; choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    edges = undirected_edges(topo)
    lap = laplacian(topo.n, edges, rates)
    graph = {
        "topology": cfg.topology,
        "nodes": topo.n,
        "edges": [list(e) for e in edges],
        "rates": rates,
        "total_rate": sum(rates),
        "chi1": chi1(lap),
        "chi2": max(resistances(lap, edges)),
        "mu": problem.mu,
        "L": problem.L,
    }
    (run / "graph.json").write_text(json.dumps(graph, indent=1))
    print(
        f"lowband dadao: {cfg.problem} (L/mu {problem.L / problem.mu:.1f}) on {cfg.topology}, "
        f"{cfg.workers} processes, {cfg.gossip_rates} rates (total {sum(rates):.3f}, "
        f"2 chi1 chi2 = {2 * graph['chi1'] * graph['chi2']:.3f}), time {cfg.time:g} -> {run}",
        flush=True,
    )
    t0 = time.perf_counter()
    launch_local(cfg, RunDir(run), resume=False, worker=dadao_worker)
    s = summarise(run, cfg, problem)
    hit = s["reached"]
    where = (
        f"error < {cfg.precision:g} at t = {hit['t']:g}: {hit['gradients']:,} gradients, "
        f"{hit['edge_activations']:,} edge activations"
        if hit
        else f"error {s['final_error']:.3g} at the end: not below {cfg.precision:g} (raise --time)"
    )
    print(f"lowband dadao: {where}; {time.perf_counter() - t0:.1f} s wall", flush=True)
    return 0


def add_parser(sub, add_config_flags) -> None:
    p = sub.add_parser(
        "dadao",
        help="DADAO on a strongly convex problem, one process per node (asynchronous gossip)",
        description="Run DADAO (Nabli and Oyallon 2023) on distributed ridge or logistic regression "
        "with one process per node, gossip on the graph's edges only, and write the distance to "
        "the optimum over time, gradients and communications (docs/decentralized.md).",
    )
    add_config_flags(p, DADAOConfig)
    p.add_argument(
        "--out", help="run folder (default: runs/dadao-PROBLEM-TIMESTAMP); must be empty"
    )
    p.set_defaults(fn=cmd_dadao)


__all__ = ["DADAOConfig", "add_parser", "cmd_dadao", "dadao_worker", "summarise", "validate"]
