"""SCAFFOLD vs FedAvg in a Flower simulation, offline on the CPU (lowband.flower).

Eight clients each hold their own least-squares problem f_i(w) = 1/2 w^T H_i w - g_i^T w (each
with a different optimum: heterogeneous data). With 10 local SGD steps per round, FedAvg's clients
drift towards their own optima and FedAvg stalls at a biased point; SCAFFOLD's control variates
remove the drift and it reaches the optimum of the sum. Half the clients are drawn per round.

    pip install 'lowband[flower-sim]'    # flwr[simulation]: Flower and Ray
    python examples/flower_scaffold.py   # about a minute on 2 CPU cores (Ray starts twice)

Your own Flower app needs the two lowband pieces shown here: a strategy on the ServerApp
(`lowband.flower.strategy("scaffold", ...)`, or scallion, scafcom, admm-nr, fedavg, fedprox) and
`FlowerClient` in the ClientApp's train function (the rule's gradient correction and reply).
"""

from __future__ import annotations

import argparse
import logging

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from lowband.flower import FlowerClient, strategy

torch.set_num_threads(1)
D, LR, SEED = 10, 0.05, 0


def client_problem(i: int, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """Client i's (H_i, g_i), from the seed: every process builds the same data."""
    gen = torch.Generator().manual_seed(SEED * 1000 + i)
    a = torch.randn(3 * d, d, generator=gen, dtype=torch.float64) * (1 + 0.25 * i)
    h = a.T @ a / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)
    return h, h @ (3 * torch.randn(d, generator=gen, dtype=torch.float64))


def optimum(n: int) -> torch.Tensor:
    hs, gs = zip(*(client_problem(i) for i in range(n)))
    return torch.linalg.solve(sum(hs), sum(gs))


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    client = FlowerClient(msg, context)  # the rule's client side (lowband.flower)
    h, g = client_problem(int(context.node_config["partition-id"]))
    y = client.start.clone()
    for _ in range(client.local_steps):  # plain local SGD, as in the papers
        y = y - LR * client.correct(y, h @ y - g)  # raw gradient in, corrected gradient out
    return client.reply(y, num_examples=1)


def server_app(algo: str, rounds: int, clients: int, local_steps: int) -> ServerApp:
    app = ServerApp()
    w_star = optimum(clients)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strat = strategy(
            algo, local_steps=local_steps, participation=0.5, seed=SEED,
            min_available_nodes=clients,  # N: wait for every client before round 1
        )  # fmt: skip

        def distance(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            w = torch.from_numpy(arrays["w"].numpy().copy())
            return MetricRecord({"distance": float((w - w_star).norm() / w_star.norm())})

        result = strat.start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(torch.zeros(D, dtype=torch.float64).numpy())}),
            num_rounds=rounds,
            evaluate_fn=distance,
        )
        final = result.evaluate_metrics_serverapp[rounds]["distance"]
        print(
            f"{algo:8s} relative distance to the optimum after {rounds} rounds: {final:.2e}; "
            f"uplink {strat.uplink_bytes:,} B, downlink {strat.downlink_bytes:,} B",
            flush=True,
        )

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", default="fedavg,scaffold")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=10)
    args = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every round at INFO
    for algo in args.algos.split(","):
        run_simulation(
            server_app=server_app(algo, args.rounds, args.clients, args.local_steps),
            client_app=client_app,
            num_supernodes=args.clients,
            backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
        )


if __name__ == "__main__":
    main()
