"""lowband.flower: lowband's federated rules as Flower (flwr) strategies.

Flower is required here (the `flower` extra, which `make install` installs): a missing flwr fails
at the import below, never skips. Strategies are driven without Ray, as Flower's own strategy
tests do: `configure_train` -> the ClientApp's train function per message -> `aggregate_train`,
through `LocalGrid`, an in-process Grid, and Flower's own `Strategy.start` loop. The ADMM-NR and
SCAFFOLD references are lowband's fp64 textbook rules (lowband.algorithms.*_reference).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from lowband.algorithms.admm_nr import _solve, admm_nr_wls
from lowband.algorithms.federated import fedavg_reference, participants
from lowband.algorithms.registry import OptionError
from lowband.algorithms.scaffold import get_compressor, scaffold_reference, simplified_reference
from lowband.errors import ConfigError
from lowband.flower import (
    STRATEGIES,
    AdmmNrStrategy,
    FlowerClient,
    ScaffoldStrategy,
    ScallionStrategy,
    strategy,
)

torch.set_num_threads(1)
NODES = [101, 205, 333, 478]  # Flower node ids (partition i is NODES[i])
D, F64 = 5, torch.float64
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _serverapp_identity():
    """Messages are created inside a ServerApp run; give this process that identity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def problem(n=4, d=D, seed=0):
    """Client i: f_i(w) = 1/2 w^T H_i w - g_i^T w, each with its own optimum (heterogeneous)."""
    gen = torch.Generator().manual_seed(seed)
    H, g = [], []
    for i in range(n):
        a = torch.randn(3 * d, d, generator=gen, dtype=F64) * (1 + 0.5 * i)
        H.append(a.T @ a / (3 * d) + 0.1 * torch.eye(d, dtype=F64))
        g.append(H[-1] @ (3 * torch.randn(d, generator=gen, dtype=F64)))
    return H, g, torch.linalg.solve(sum(H), sum(g))


def grads_of(H, g):
    return [lambda w, i=i: H[i] @ w - g[i] for i in range(len(H))]


def sgd_client(grads, lr):
    """A ClientApp train function: the strategy's K local SGD steps on partition i's loss."""

    def train(msg: Message, context: Context) -> Message:
        client = FlowerClient(msg, context)
        grad = grads[context.node_config["partition-id"]]
        y = client.start.clone()
        for _ in range(client.local_steps):
            y = y - lr * client.correct(y, grad(y))
        return client.reply(y, num_examples=1)

    return train


class LocalGrid(Grid):
    """Flower's Grid in process: each message goes to its node's train function and context."""

    def __init__(self, train, nodes=NODES):
        self.train, self.nodes = train, list(nodes)
        self.contexts = {
            n: Context(1, n, {"partition-id": i, "num-partitions": len(nodes)}, RecordDict(), {})
            for i, n in enumerate(self.nodes)
        }

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        self.replies = {
            str(i): self.train(m, self.contexts[m.metadata.dst_node_id])
            for i, m in enumerate(messages)
        }
        return list(self.replies)

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def record(x: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({"w": Array(x.numpy().copy())})


def one_round(strat, grid, r, x):
    """Flower's round r, as Strategy.start runs it: the new x (flat) and the aggregate metrics."""
    from flwr.app import ConfigRecord

    replies = grid.send_and_receive(strat.configure_train(r, record(x), ConfigRecord(), grid))
    arrays, metrics = strat.aggregate_train(r, replies)
    return torch.from_numpy(arrays["w"].numpy().copy()), metrics


def chosen_indices(m, seed, r):
    return [NODES.index(n) for n in participants(NODES, m, seed, r)]


# -- each strategy against lowband's fp64 reference on the same inputs ------------------------------


@pytest.mark.parametrize("m", [4, 2])
def test_scaffold_strategy_is_the_reference_round_for_round(m):
    H, g, _ = problem()
    lr, k = 0.05, 3
    strat = ScaffoldStrategy(local_steps=k, clients_per_round=m, seed=3)
    grid = LocalGrid(sgd_client(grads_of(H, g), lr))
    x = torch.zeros(D, dtype=F64)
    ref = (x, x.clone(), [x.clone() for _ in NODES])
    for r in range(1, 6):
        x, metrics = one_round(strat, grid, r, x)
        ref = scaffold_reference(*ref, grads_of(H, g), k=k, lr=lr, clients=chosen_indices(m, 3, r))
        torch.testing.assert_close(x, ref[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(strat.c, ref[1], rtol=0, atol=1e-12)
        assert metrics["round-clients"] == m
    for i, n in enumerate(NODES):  # every client's c_i, kept in its Flower context
        state = grid.contexts[n].state
        c_i = state["lowband"]["c_i"].numpy().copy() if "lowband" in state else np.zeros(D)
        torch.testing.assert_close(torch.from_numpy(c_i), ref[2][i], rtol=0, atol=1e-12)
    # c = mean c_i over all N clients (clients never drawn hold c_i = 0)
    torch.testing.assert_close(strat.c, torch.stack(ref[2]).mean(0), rtol=0, atol=1e-12)


def test_a_client_that_fails_is_a_non_participant_of_its_round():
    """Failure injection: node 205 answers round 2 with an error (its state untouched); the round
    is SCAFFOLD's over the three others, and c = mean c_i still holds."""
    from flwr.app import Error

    H, g, _ = problem()
    ok = sgd_client(grads_of(H, g), 0.05)

    def flaky(msg, context):
        round_ = msg.content["config"]["server-round"]
        if context.node_id == 205 and round_ == 2:
            return Message(Error(code=1, reason="killed at round 2"), reply_to=msg)
        return ok(msg, context)

    strat, grid = ScaffoldStrategy(local_steps=2), LocalGrid(flaky)
    x = torch.zeros(D, dtype=F64)
    ref = (x, x.clone(), [x.clone() for _ in NODES])
    for r in range(1, 4):
        x, metrics = one_round(strat, grid, r, x)
        clients = [0, 2, 3] if r == 2 else [0, 1, 2, 3]
        ref = scaffold_reference(*ref, grads_of(H, g), k=2, lr=0.05, clients=clients)
        torch.testing.assert_close(x, ref[0], rtol=0, atol=1e-12)
        assert metrics["round-clients"] == len(clients)
    torch.testing.assert_close(strat.c, torch.stack(ref[2]).mean(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, mu", [("fedavg", 0.0), ("fedprox", 0.1)])
def test_fedavg_and_fedprox_strategies_are_the_reference(name, mu):
    H, g, _ = problem()
    opts = {"mu": mu} if name == "fedprox" else {}
    strat = strategy(name, local_steps=4, server_lr=0.7, **opts)
    grid = LocalGrid(sgd_client(grads_of(H, g), 0.05))
    x = ref = torch.zeros(D, dtype=F64)
    for r in range(1, 4):
        x, _ = one_round(strat, grid, r, x)
        ref = fedavg_reference(ref, grads_of(H, g), k=4, lr=0.05, server_lr=0.7, mu=mu)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "name, options",
    [
        ("scallion", {"compressor": "identity"}),
        ("scafcom", {"compressor": "identity", "beta": 1.0}),
        ("scallion", {"compressor": "randk:0.4", "cv_scale": 0.5}),
    ],
)
def test_one_vector_strategies_are_the_simplified_form(name, options):
    """Identity (SCAFCOM with beta 1) is the simplified form; rand-k with the same shared seeds
    as the clients' gives the reference's iterates with the same compressed deltas."""
    H, g, _ = problem()
    lr, k, seed = 0.05, 3, 7
    strat = strategy(name, local_steps=k, local_lr=lr, seed=seed, **options)
    grid = LocalGrid(sgd_client(grads_of(H, g), lr))
    comp = get_compressor(options["compressor"])
    x = torch.zeros(D, dtype=F64)
    ref = (x, x.clone(), [x.clone() for _ in NODES])
    for r in range(1, 5):
        x, metrics = one_round(strat, grid, r, x)
        compress = lambda v, i, r=r: comp(v, (seed, r, NODES[i])).to(F64)  # noqa: E731
        compress = None if options["compressor"] == "identity" else compress  # fp64 kept
        ref = simplified_reference(
            *ref, grads_of(H, g), k=k, lr=lr, compress=compress, alpha=options.get("cv_scale", 1)
        )
        torch.testing.assert_close(x, ref[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(strat.c, ref[1], rtol=0, atol=1e-10)
    values = int(np.ceil(0.4 * D)) if "randk" in options["compressor"] else D
    assert metrics["uplink-bytes"] == 4 * len(NODES) * values * 8  # only k fp64 values travel


@pytest.mark.parametrize("m", [4, 2])
def test_admm_nr_strategy_is_the_exact_solve_reference(m):
    """Exact local solves, no noise: the Flower strategy's z is admm_nr_wls's, round for round,
    with full and partial participation (a client drawn after a pause gets its z_end)."""
    H, g, _ = problem()
    rho, seed = 1.0, 5

    def exact(msg, context):
        client = FlowerClient(msg, context)
        i = context.node_config["partition-id"]
        y = _solve(H[i], g[i], rho, client.anchor)
        client.correct(y, H[i] @ y - g[i])  # the gradient at the new local model
        return client.reply(y)

    strat = AdmmNrStrategy(rho=rho, clients_per_round=m, seed=seed)
    grid = LocalGrid(exact)
    zs = admm_nr_wls(H, g, rho, 8, lambda r: chosen_indices(m, seed, r + 1), 0.0, None)
    x = torch.zeros(D, dtype=F64)
    for r in range(1, 9):
        x, _ = one_round(strat, grid, r, x)
        torch.testing.assert_close(x, zs[r - 1], rtol=0, atol=1e-12)


# -- behaviour --------------------------------------------------------------------------------------


def run_flower(name, rounds, **options):
    """Flower's own Strategy.start loop over LocalGrid; the final x and the Result."""
    H, g, w_star = problem(seed=1)
    strat = strategy(name, **options)
    result = strat.start(
        grid=LocalGrid(sgd_client(grads_of(H, g), 0.05)),
        initial_arrays=record(torch.zeros(D, dtype=F64)),
        num_rounds=rounds,
    )
    x = torch.from_numpy(result.arrays["w"].numpy().copy())
    return (x - w_star).norm() / w_star.norm(), strat, result


def test_scaffold_via_flower_converges_where_fedavg_stalls():
    fedavg, fa, _ = run_flower("fedavg", 80, local_steps=10)
    scaffold, sc, result = run_flower("scaffold", 80, local_steps=10)
    fedavg_late, _, _ = run_flower("fedavg", 40, local_steps=10)
    assert abs(fedavg - fedavg_late) < 1e-3 * fedavg  # FedAvg has stopped moving...
    assert fedavg > 1e-2  # ...at a biased point
    assert scaffold < 1e-8  # SCAFFOLD reaches the optimum
    assert sc.uplink_bytes == 2 * fa.uplink_bytes == 80 * len(NODES) * 2 * D * 8
    assert result.train_metrics_clientapp[80]["round-clients"] == len(NODES)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="no Flower strategy 'scafold'"):
        strategy("scafold")
    with pytest.raises(OptionError, match="local_steps must be at least 1"):
        ScaffoldStrategy(local_steps=0)
    with pytest.raises(ConfigError, match="biased; ScallionStrategy needs an unbiased"):
        ScallionStrategy(compressor="topk:0.1")
    assert set(STRATEGIES) == {"fedavg", "fedprox", "scaffold", "scallion", "scafcom", "admm-nr"}


def test_the_flower_extra_is_installed_by_make():
    extra = re.search(r"^flower = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M)
    assert extra and "flwr" in extra.group(1)
    install = re.search(r"pip install -q -e '\.\[([\w,]+)\]'", (ROOT / "Makefile").read_text())
    assert install and "flower" in install.group(1).split(",")


def test_the_examples_client_app_learns_without_ray():
    """examples/flower_scaffold.py's ClientApp function and settings, on LocalGrid (the example
    itself runs Ray's simulation: about a minute, docs/federated.md)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ex", ROOT / "examples" / "flower_scaffold.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    w_star, dist = ex.optimum(8), {}
    for name in ("fedavg", "scaffold"):
        strat = strategy(name, local_steps=10, participation=0.5, min_available_nodes=8)
        result = strat.start(
            grid=LocalGrid(ex.train, nodes=range(11, 19)),
            initial_arrays=record(torch.zeros(ex.D, dtype=F64)),
            num_rounds=60,
        )
        w = torch.from_numpy(result.arrays["w"].numpy().copy())
        dist[name] = float((w - w_star).norm() / w_star.norm())
    assert dist["scaffold"] < 1e-2 < 0.3 < dist["fedavg"]
