"""ZOTrainer checks the starting weights as every algorithm does (issue #19, point 4).

Every ZO update is applied locally from seeds and scalars, so ranks that start apart stay apart
for ever, silently. The constructor all-gathers one 8-byte digest per rank and broadcasts rank
0's parameters only when they differ (lowband.algorithms.base.ensure_same_start). Two real
processes on Gloo: one pair built from different seeds, one pair from the same seed.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import traceback

STEPS = 4


def _worker(rank: int, path: str, results) -> None:
    import torch
    import torch.distributed as dist

    import lowband
    from lowband.models import ModelConfig, build_model
    from lowband.zo import ZOTrainer
    from lowband.zo.loop import param_digest

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{path}", rank=rank, world_size=2,
            timeout=datetime.timedelta(seconds=30),
        )  # fmt: skip
        comm = lowband.Comm(dist.group.WORLD)
        cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=32)
        out = {}
        for case, seed in (("apart", rank), ("together", 0)):
            model = build_model(cfg, seed=seed)
            before = param_digest(model)
            sent = comm.stats.bytes_sent
            zo = ZOTrainer(model, comm, lr=1e-2, eps=1e-3, seed=3)
            out[case] = {
                "before": before,
                "start": param_digest(model),
                "broadcast": zo.broadcast_at_start,
                "start_bytes": comm.stats.bytes_sent - sent,
            }
            for step in range(STEPS):
                g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own batch
                t = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
                zo.step(lambda m, b: m.loss(*b), (t[:, :-1], t[:, 1:]), step)
            out[case]["end"] = param_digest(model)
        results.put((rank, out))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the test
        results.put((rank, traceback.format_exc()))


def test_ranks_that_start_apart_take_rank_0s_weights_and_stay_identical(tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, str(tmp_path / "store"), results)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank, value in got.items():
        assert isinstance(value, dict), f"rank {rank}:\n{value}"
    r0, r1 = got[0], got[1]

    apart0, apart1 = r0["apart"], r1["apart"]
    assert apart0["before"] != apart1["before"]  # the two really started apart
    assert apart0["broadcast"] and apart1["broadcast"]
    assert apart1["start"] == apart0["start"] == apart0["before"]  # rank 0's weights, bit for bit
    assert apart0["end"] == apart1["end"] != apart0["start"]  # trained, and still identical
    # The digest all-gather (8 bytes to the one peer) plus rank 0's broadcast of the model.
    assert apart0["start_bytes"] > 8 and apart1["start_bytes"] == 8

    same0, same1 = r0["together"], r1["together"]
    assert not same0["broadcast"] and not same1["broadcast"]
    assert same0["start_bytes"] == same1["start_bytes"] == 8  # the digest only
    assert same0["start"] == same0["before"] and same0["end"] == same1["end"]
