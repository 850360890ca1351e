"""Decentralized training over a graph (docs/decentralized.md): the topologies and their mixing
matrices, D-PSGD / DFedSAM / DFedSAM-MGS against the matrix form of their rule in fp64, bytes per
edge, a neighbour that never answers, and the CLI end to end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from outer_helpers import one_intra_op_thread  # noqa: F401
from torch import nn

from lowband.algorithms.dfedsam import DFedSAM, DFedSAMMGS
from lowband.algorithms.dpsgd import DPSGD, dpsgd_round_reference
from lowband.cli import main
from lowband.comm import Comm, LinkSpec
from lowband.comm.sync import SyncGroup
from lowband.decentral import parse_topology
from lowband.decentral.dadao import DADAONode, gossip_rates, simulate, undirected_edges
from lowband.decentral.topology import Topology, metropolis
from lowband.errors import ConfigError
from lowband.testing import run_ranks

LR, D_IN, D_OUT = 0.1, 3, 2


# -- topologies ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["ring", "torus", "exponential", "complete", "erdos:0.6"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12])
def test_every_topology_is_doubly_stochastic_symmetric_and_connected(spec, n):
    topo = parse_topology(spec, n, seed=1)
    W = topo.W
    assert W.dtype == torch.float64 and W.shape == (n, n)
    assert torch.allclose(W.sum(0), torch.ones(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(W.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(W, W.T) and (W >= 0).all()
    # connected: W^n has no zero entry (a path of length <= n - 1 between every pair, self loops)
    assert (torch.linalg.matrix_power(W, n) > 0).all()
    assert 0.0 < topo.spectral_gap <= 1.0 + 1e-12
    for i in range(n):  # a neighbour list is exactly the non-zero off-diagonal weights
        assert topo.in_neighbours(i) == [j for j in range(n) if j != i and W[i, j] > 0]


@pytest.mark.parametrize("n", [4, 5, 8, 16, 33])
def test_ring_spectral_gap_is_the_known_formula(n):
    # every Metropolis weight of a ring is 1/3: eigenvalues 1/3 + 2/3 cos(2 pi k / n)
    expected = 2.0 / 3.0 * (1.0 - math.cos(2 * math.pi / n))
    assert parse_topology("ring", n).spectral_gap == pytest.approx(expected, abs=1e-12)


def test_shapes_of_the_graphs():
    assert len(parse_topology("ring", 8).edges()) == 2 * 8
    assert len(parse_topology("complete", 6).edges()) == 6 * 5
    assert parse_topology("torus", 12).in_neighbours(0) == [1, 3, 4, 8]  # 3 x 4 grid, wrapped
    assert parse_topology("exponential", 8).in_neighbours(0) == [1, 2, 4, 6, 7]
    # the exponential graph mixes faster than the ring
    assert (
        parse_topology("exponential", 16).spectral_gap > 5 * parse_topology("ring", 16).spectral_gap
    )
    # erdos draws are a pure function of the seed
    assert torch.equal(parse_topology("erdos:0.5", 9, 4).W, parse_topology("erdos:0.5", 9, 4).W)


def test_bad_topologies_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no connected graph"):
        parse_topology("erdos:0.01", 16, seed=0)
    with pytest.raises(ConfigError, match="unknown --topology"):
        parse_topology("star", 4)
    with pytest.raises(ConfigError, match=r"P must be a number in \(0, 1\]"):
        parse_topology("erdos:1.5", 4)
    two_parts = tmp_path / "split.json"
    two_parts.write_text(json.dumps({"nodes": 4, "edges": [[0, 1], [2, 3]]}))
    with pytest.raises(ConfigError, match="not connected"):
        parse_topology(str(two_parts), 4)
    with pytest.raises(ConfigError, match="the file has 4 nodes, the run 5 workers"):
        parse_topology(str(two_parts), 5)
    not_doubly = tmp_path / "row.json"
    not_doubly.write_text(
        json.dumps({"nodes": 2, "edges": [[0, 1]], "weights": [[0.5, 0.5], [0.2, 0.8]]})
    )
    with pytest.raises(ConfigError, match="not doubly stochastic"):
        parse_topology(str(not_doubly), 2)


def test_a_directed_ring_from_a_file(tmp_path):
    n = 5
    W = [[0.5 if j == i or j == (i - 1) % n else 0.0 for j in range(n)] for i in range(n)]
    path = tmp_path / "dring.json"
    path.write_text(
        json.dumps(
            {
                "nodes": n,
                "directed": True,
                "edges": [[i, (i + 1) % n] for i in range(n)],
                "weights": W,
            }
        )
    )
    topo = parse_topology(str(path), n)
    assert topo.directed and topo.in_neighbours(2) == [1] and topo.out_neighbours(2) == [3]
    wrong = tmp_path / "wrong.json"  # weights on the reverse edges
    wrong.write_text(
        json.dumps({**json.loads(path.read_text()), "weights": torch.tensor(W).T.tolist()})
    )
    with pytest.raises(ConfigError, match="is not an edge"):
        parse_topology(str(wrong), n)


# -- the rule, in fp64 --------------------------------------------------------------------------
def _model() -> nn.Module:
    """The same start on every call and thread: a private generator (torch.manual_seed is
    process-wide, and run_ranks' threads would race for it)."""
    model = nn.Linear(D_IN, D_OUT, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(4, D_IN, generator=g, dtype=torch.float64)
    return x, x @ torch.full((D_IN, D_OUT), float(rank + 1), dtype=torch.float64)


def _loss(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = _data(rank, step)
    return ((model(x) - y) ** 2).mean()


def _train(comm: Comm, cls, steps: int, **options):
    """Each worker starts from its own model (rank-dependent), takes SGD steps on its own data;
    returns its parameters before and after every gossip round."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    algo = cls(model, opt, comm, **options)
    with torch.no_grad():  # after the common start: distinct models, so the mixing shows
        for p in model.parameters():
            p.add_(0.1 * (comm.rank + 1))
    before, after = [], []
    for step in range(1, steps + 1):
        algo.closure = lambda s=step: _loss(model, comm.rank, s)
        _loss(model, comm.rank, step).backward()
        algo.sync_gradients()
        opt.step()
        opt.zero_grad()
        if step % algo.K == 0:
            before.append(_flat(model))
        algo.step()
        if step % algo.K == 0:
            after.append(_flat(model))
    return before, after, dict(algo.bytes_to), comm.stats.by_op()


def test_one_dpsgd_round_is_W_times_X_in_fp64():
    n = 5
    out = run_ranks(n, _train, DPSGD, 2, topology="ring", sync_every=1)
    W = parse_topology("ring", n).W
    for r in range(2):
        X_half = torch.stack([o[0][r] for o in out])
        X_new = torch.stack([o[1][r] for o in out])
        assert not torch.allclose(X_half[0], X_half[1])  # the workers really differ
        torch.testing.assert_close(X_new, dpsgd_round_reference(X_half, W), rtol=0, atol=1e-14)
    # the average over the graph is preserved by a doubly stochastic W
    torch.testing.assert_close(X_new.mean(0), X_half.mean(0), rtol=0, atol=1e-14)


def test_dfedsam_with_rho_zero_is_dpsgd_bit_for_bit():
    plain = run_ranks(4, _train, DPSGD, 4, topology="ring", sync_every=2)
    sam0 = run_ranks(4, _train, DFedSAM, 4, topology="ring", sync_every=2, sam_rho=0.0)
    sam = run_ranks(4, _train, DFedSAM, 4, topology="ring", sync_every=2, sam_rho=0.05)
    for a, b, c in zip(plain, sam0, sam):
        assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
        assert not torch.equal(a[1][-1], c[1][-1])  # rho > 0 does change the trajectory


def test_the_sam_step_is_the_textbook_one():
    """One worker, one step: the optimizer steps with grad f(w + rho g / ||g||) on the same batch."""
    rho = 0.3
    (before, after, _, _) = run_ranks(1, _train, DFedSAM, 1, sync_every=1, sam_rho=rho)[0]
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    w = _flat(model)
    g = torch.autograd.grad(_loss(model, 0, 1), list(model.parameters()))
    g = torch.cat([t.reshape(-1) for t in g])
    with torch.no_grad():
        offset = 0
        e = rho * g / g.norm()
        for p in model.parameters():
            p.add_(e[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    g_sam = torch.autograd.grad(_loss(model, 0, 1), list(model.parameters()))
    g_sam = torch.cat([t.reshape(-1) for t in g_sam])
    torch.testing.assert_close(before[0], w - LR * g_sam, rtol=0, atol=1e-14)
    assert not torch.allclose(g_sam, g)


def test_mgs_on_the_complete_graph_or_with_many_steps_is_the_average():
    # complete graph: W = 11^T/n, one gossip step already averages exactly
    out = run_ranks(4, _train, DFedSAMMGS, 2, topology="complete", sync_every=2, gossip_steps=1)
    X_half = torch.stack([o[0][0] for o in out])
    for o in out:
        torch.testing.assert_close(o[1][0], X_half.mean(0), rtol=0, atol=1e-14)
    # a ring with Q = 60: W^Q -> 11^T/n (gap 1/3 at n = 4: error ~ (2/3)^60 ~ 3e-11)
    out = run_ranks(4, _train, DFedSAMMGS, 2, topology="ring", sync_every=2, gossip_steps=60)
    X_half = torch.stack([o[0][0] for o in out])
    spread = max(float((o[1][0] - X_half.mean(0)).abs().max()) for o in out)
    assert spread < 1e-9
    # ... and Q = 1 on the same ring does not average
    out = run_ranks(4, _train, DFedSAMMGS, 2, topology="ring", sync_every=2, gossip_steps=1)
    X_half = torch.stack([o[0][0] for o in out])
    assert max(float((o[1][0] - X_half.mean(0)).abs().max()) for o in out) > 1e-3


def test_bytes_per_edge_are_exact_and_only_along_edges():
    n, rounds, Q = 5, 3, 2
    out = run_ranks(n, _train, DFedSAMMGS, rounds, topology="ring", sync_every=1, gossip_steps=Q)
    numel = D_IN * D_OUT + D_OUT
    for rank, (_, _, bytes_to, by_op) in enumerate(out):
        assert sorted(bytes_to) == sorted({(rank - 1) % n, (rank + 1) % n})
        assert all(b == rounds * Q * numel * 8 for b in bytes_to.values())  # fp64 on the wire
        assert by_op["send"]["bytes_sent"] == sum(bytes_to.values())
        assert by_op["recv"]["bytes_recv"] == sum(bytes_to.values())
        assert set(by_op) <= {"send", "recv", "all_gather"}  # no collective but the start check


def test_bits_16_sends_half_the_bytes():
    out = run_ranks(3, _train, DPSGD, 1, topology="ring", sync_every=1, bits=16)
    numel = D_IN * D_OUT + D_OUT
    assert all(b == 2 * numel for b in out[0][2].values())


# -- a neighbour that never answers -------------------------------------------------------------
class _Group(SyncGroup):
    """An elastic-like group that records the errors reported to it."""

    elastic = True

    def __init__(self, comm) -> None:
        self.comm, self.errors = comm, []

    def report(self, error: BaseException) -> None:
        self.errors.append(error)


def _silent_neighbour(comm: Comm, silent: int):
    model = _model()
    group = _Group(comm)
    algo = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), group, topology="ring")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(comm.rank + 1))
    if comm.rank == silent:
        return None
    topo = algo.topology(comm.size)
    x, lost = algo._gossip(_flat(model), topo, tag=7)
    return x, lost, len(group.errors)


def test_a_silent_neighbour_has_its_weight_moved_to_self():
    n, silent = 4, 2
    out = run_ranks(n, _silent_neighbour, silent, timeout_s=3.0)
    W = parse_topology("ring", n).W
    for rank in (1, 3):  # the silent worker's neighbours: its weight goes to their own model
        x, lost, errors = out[rank]
        assert lost == {silent} and errors >= 1
        row = W[rank].clone()
        row[rank] += row[silent]
        row[silent] = 0
        expected = sum(float(row[j]) * (j + 1) for j in range(n))
        torch.testing.assert_close(x, torch.full_like(x, expected), rtol=0, atol=1e-14)
    x, lost, errors = out[0]  # not a neighbour of 2: unaffected
    assert lost == set() and errors == 0
    assert float(x[0]) == pytest.approx(float(W[0] @ torch.arange(1.0, n + 1, dtype=torch.float64)))


# -- the CLI ------------------------------------------------------------------------------------
FAST = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "4", "--eval-batches", "2"]


def _events(run: Path, kind: str, rank: int) -> list[dict]:
    lines = (run / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


def test_cli_dpsgd_on_a_ring_end_to_end(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--algo", "dfedsam-mgs", "--topology", "ring", "--workers", "4"]
    argv += ["--steps", "4", "--sync-every", "2", "--gossip-steps", "2", "--out", str(out), *FAST]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["final_eval_loss"])
    (topo,) = _events(out, "topology", 0)
    assert topo["nodes"] == 4 and topo["spectral_gap"] == pytest.approx(2 / 3)
    params = json.loads((out / "meta.json").read_text())["model_params"]
    for rank in range(4):
        (edges,) = _events(out, "edge_bytes", rank)
        # 2 rounds x 2 gossip steps x fp32 parameters, to each of the two ring neighbours
        assert edges["sent_to"] == {str((rank - 1) % 4): 2 * 2 * 4 * params,
                                    str((rank + 1) % 4): 2 * 2 * 4 * params}  # fmt: skip
    assert summary["bytes_by_op"]["send"] == 2 * 2 * 2 * 4 * params  # rank 0's


def test_cli_dpsgd_on_two_sites_charges_each_edge_its_own_link(tmp_path):
    """--link-map: a ring over two sites, so every worker has one fast neighbour (same site) and
    one slow one (the other site); each message is charged its pair's link."""
    sites = {"sites": [[0, 1], [2, 3]], "intra": "10gbit:0.1ms", "inter": "100mbit:80ms"}
    link_map = tmp_path / "sites.json"
    link_map.write_text(json.dumps(sites))
    out = tmp_path / "run"
    argv = ["train", "--algo", "dpsgd", "--topology", "ring", "--workers", "4", "--steps", "2",
            "--link-map", str(link_map), "--out", str(out), *FAST]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["link_map"] == str(link_map)
    nbytes = 4 * json.loads((out / "meta.json").read_text())["model_params"]  # fp32, one message
    fast, slow = LinkSpec.parse(sites["intra"]), LinkSpec.parse(sites["inter"])
    for rank in range(4):
        (edges,) = _events(out, "edge_bytes", rank)
        for j in ((rank - 1) % 4, (rank + 1) % 4):
            link = fast if j // 2 == rank // 2 else slow
            assert edges["sent_to"][str(j)] == 2 * nbytes  # 2 rounds, one gossip step each
            assert edges["link_s_to"][str(j)] == pytest.approx(2 * link.ideal_time(nbytes, 1))
        times = sorted(edges["link_s_to"].values())
        assert times[1] > 50 * times[0]  # the slow edge dominates
    # and the wall clock shows it: each round waits for the worker's cross-site neighbour
    summary = json.loads((out / "summary.json").read_text())
    assert summary["comm_time_per_worker"] >= 0.9 * 2 * slow.ideal_time(nbytes, 1)
    # the report draws the graph from the topology and edge_bytes events
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "graph and bytes per edge" in (tmp_path / "report" / "index.html").read_text()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--topology", "erdos:0.01", "--workers", "8"], "no connected graph"),
        (["--topology", "star"], "unknown --topology"),
        (["--topology", "nowhere.json"], "no such file"),
        (["--sam-rho", "-1", "--algo", "dfedsam"], "--sam-rho must be in [0, 10]"),
        (["--gossip-steps", "0", "--algo", "dfedsam-mgs"], "--gossip-steps must be in [1, 1000]"),
        (["--gossip-steps", "2", "--algo", "dfedsam"], "--gossip-steps applies to --algo"),
    ],
)
def test_cli_refuses_bad_graph_options_in_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), *flags]
    if "--algo" not in flags:
        argv += ["--algo", "dpsgd"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


# -- DADAO --------------------------------------------------------------------------------------
N_DADAO, D_DADAO, M_DADAO, REG = 8, 4, 12, 0.5


def _ridge(n: int = N_DADAO):
    """Distributed ridge regression with heterogeneous data: f_i(x) = (1/m)||A_i x - b_i||^2 +
    (reg/2)||x||^2, each worker's b_i around a different target. Returns grad, mu, L, x*."""
    g = torch.Generator().manual_seed(0)
    H, c = [], []
    for i in range(n):
        A = torch.randn(M_DADAO, D_DADAO, generator=g, dtype=torch.float64)
        b = A @ torch.full((D_DADAO,), float(i), dtype=torch.float64)
        b += 0.1 * torch.randn(M_DADAO, generator=g, dtype=torch.float64)
        H.append(2 / M_DADAO * A.T @ A + REG * torch.eye(D_DADAO, dtype=torch.float64))
        c.append(2 / M_DADAO * A.T @ b)
    mu = min(float(torch.linalg.eigvalsh(h)[0]) for h in H)
    L = max(float(torch.linalg.eigvalsh(h)[-1]) for h in H)
    return (lambda i, x: H[i] @ x - c[i]), mu, L, torch.linalg.solve(sum(H), sum(c))


def test_dadao_converges_linearly_to_the_optimum():
    grad, mu, L, x_star = _ridge()
    topo = parse_topology("ring", N_DADAO)
    errors: dict[int, float] = {}

    def record(t, states):
        errors[int(t // 30)] = float(sum(((s.x - x_star) ** 2).sum() for s in states)) / N_DADAO

    simulate(topo, grad, torch.zeros(D_DADAO, dtype=torch.float64), mu, L, t_max=120.0,
             record=record)  # fmt: skip
    e = [errors[k] for k in range(4)]  # the error at the end of each 30-unit window
    assert e[3] < 1e-3 * e[0]
    # linear: every window divides the error by a similar factor (not a slowing sublinear decay)
    ratios = [e[k + 1] / e[k] for k in range(3)]
    assert all(r < 0.2 for r in ratios), ratios
    assert max(ratios[1:]) < 10 * min(ratios[1:]), ratios


def test_dadao_rates():
    ring = parse_topology("ring", 6)
    uniform, resistance = gossip_rates(ring, "uniform"), gossip_rates(ring, "resistance")
    assert len(uniform) == 6 and sum(uniform) == pytest.approx(sum(resistance))
    assert resistance == pytest.approx(uniform)  # every ring edge has the same resistance
    edges = [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)]  # two triangles, a bridge
    barbell = Topology("barbell", 6, metropolis(6, set(edges)))
    by_edge = dict(zip(undirected_edges(barbell), gossip_rates(barbell, "resistance")))
    assert by_edge[(2, 3)] == max(by_edge.values()) and by_edge[(2, 3)] == pytest.approx(
        1.5 * by_edge[(0, 1)]
    )  # resistance 1 vs 2/3
    with pytest.raises(ConfigError, match="unknown --gossip-rates"):
        gossip_rates(ring, "fastest")


def _dadao_node(comm: Comm, t_max: float):
    grad, mu, L, _ = _ridge(comm.size)
    topo = parse_topology("ring", comm.size)
    node = DADAONode(comm, topo, grad, torch.zeros(D_DADAO, dtype=torch.float64), mu, L, t_max)

    t0 = time.perf_counter()
    state = node.run()
    return state.P, node.dropped, time.perf_counter() - t0, node.gossips


def test_dadao_nodes_replay_the_reference_bit_for_bit():
    n, t_max = 4, 20.0
    out = run_ranks(n, _dadao_node, t_max)
    grad, mu, L, _ = _ridge(n)
    ref = simulate(parse_topology("ring", n), grad, torch.zeros(D_DADAO, dtype=torch.float64),
                   mu, L, t_max)  # fmt: skip
    for rank, (P, dropped, _, gossips) in enumerate(out):
        assert dropped == set() and gossips > 0
        assert torch.equal(P, ref[rank].P), rank


def _resume(comm: Comm):
    model = _model()
    algo = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), comm, topology="ring")
    for _ in range(2):
        _loss(model, comm.rank, 1).backward()
        algo.step()
    state = algo.state_dict()
    fresh = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), comm, topology="ring")
    fresh.load_state_dict(state)  # a resume: this worker's own counts come back
    healed = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), comm, topology="ring")
    healed.bytes_to = {9: 1}
    other = {**state, "bytes_to": {**state["bytes_to"], "owner": (comm.rank + 1) % comm.size}}
    healed.load_state_dict(other)  # a heal from a peer: the peer's per-edge counts stay its own
    return algo.bytes_to, fresh.bytes_to, fresh.rounds, healed.bytes_to, healed.rounds


def test_state_round_trips_and_a_heal_keeps_its_own_edge_counts():
    for sent, resumed, rounds, healed, healed_rounds in run_ranks(3, _resume):
        assert resumed == sent and len(sent) == 2 and rounds == 2
        assert healed == {9: 1} and healed_rounds == 2


_SIGSTOP_WORKER = r"""
import datetime, json, os, signal, sys, time
import torch
torch.set_num_threads(1)
import torch.distributed as dist
from lowband.comm import Comm, LinkSpec
from lowband.decentral import parse_topology
from lowband.decentral.dadao import DADAONode

rank, world, store_path, out, timeout = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
rank, world, timeout = int(rank), int(world), float(timeout)
store = dist.FileStore(store_path, world)
comm = Comm(dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=timeout)))
g = torch.Generator().manual_seed(rank)
A = torch.randn(12, 4, generator=g, dtype=torch.float64)
H, c = 2 / 12 * A.T @ A + 0.5 * torch.eye(4, dtype=torch.float64), A.T @ torch.ones(12, dtype=torch.float64)
node = DADAONode(comm, parse_topology("ring", world), lambda i, x: H @ x - c,
                 torch.zeros(4, dtype=torch.float64), mu=0.5, L=20.0, t_max=20.0)

def stall(k):
    if rank == 2 and k == 3:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen here until the test sends SIGCONT

t0 = time.perf_counter()
state = node.run(stall)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"dropped": sorted(node.dropped), "seconds": time.perf_counter() - t0,
               "finite": bool(torch.isfinite(state.P).all())}, f)
"""


def test_a_sigstopped_dadao_process_does_not_stop_its_neighbours(tmp_path):
    """Four processes on a ring; rank 2 SIGSTOPs itself mid-run. Its neighbours drop it after the
    process group's timeout and finish while it is still stopped; then it is continued and ends."""
    import os
    import signal
    import subprocess
    import sys

    world, timeout = 4, 2.0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _SIGSTOP_WORKER,
                str(r),
                str(world),
                str(tmp_path / "store"),
                str(tmp_path),
                str(timeout),
            ],
            env=env,
        )  # fmt: skip
        for r in range(world)
    ]
    try:
        others = [tmp_path / f"rank{r}.json" for r in (0, 1, 3)]
        deadline = time.monotonic() + 120
        while not all(p.exists() for p in others) and time.monotonic() < deadline:
            assert all(p.poll() in (None, 0) for p in procs), [p.poll() for p in procs]
            time.sleep(0.2)
        assert all(p.exists() for p in others), "a neighbour of the stopped process hung"
        assert not (tmp_path / "rank2.json").exists()  # it is still stopped
        results = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1, 3)}
        assert 2 in results[1]["dropped"] and 2 in results[3]["dropped"]
        assert all(v["finite"] and v["seconds"] < 60 for v in results.values())
        os.kill(procs[2].pid, signal.SIGCONT)
        assert procs[2].wait(timeout=60) == 0
        assert all(p.wait(timeout=30) == 0 for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
