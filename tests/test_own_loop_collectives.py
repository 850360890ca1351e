"""A user's own collectives beside lowband's background reductions, on the same process group.

The everyday pattern: `dist.all_reduce(loss)` for logging every step, with lowband given
`dist.group.WORLD`. Streaming DiLoCo with an overlap and CO2 with its one-round delay reduce on a
background thread; on a shared group the two would be matched in different orders on different
ranks and both hang. The background reductions run on a private group of the same ranks, so
this must finish, and give the same result as the same run without the logging collective.
Real processes: a private group is made with dist.new_group, which needs the default world.
"""

from __future__ import annotations

import datetime
import itertools
import multiprocessing as mp
import traceback

ALGOS = {
    "ddp": "DDP(model, opt, comm)",
    "diloco": "DiLoCo(model, opt, comm, sync_every=3)",
    "streaming-overlap": "StreamingDiLoCo(model, opt, comm, sync_every=4, fragments=2, overlap=1)",
    "noloco": "NoLoCo(model, opt, comm, sync_every=3)",
    "co2-delay1": "CO2(model, opt, comm, sync_every=3)",
}


def _worker(rank: int, world: int, path: str, results) -> None:
    """Every algorithm without, then with, the logging collective, in the same two processes (one
    pair of process start-ups instead of two); the result of each, keyed by log_loss."""
    import torch
    import torch.distributed as dist

    import lowband
    from lowband.models import ModelConfig, build_model

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{path}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=30),  # a hang fails the test instead of blocking
        )
        comm = lowband.Comm(dist.group.WORLD)
        cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=32)
        out = {False: {}, True: {}}
        for log_loss, (name, make) in itertools.product((False, True), ALGOS.items()):
            model = build_model(cfg, seed=1)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            algo = eval(make, {**vars(lowband), "model": model, "opt": opt, "comm": comm})
            for step in range(12):
                g = torch.Generator().manual_seed(100 * step + rank)
                t = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
                loss = model.loss(t[:, :-1], t[:, 1:])
                loss.backward()
                algo.sync_gradients()
                opt.step()
                opt.zero_grad()
                algo.step()
                if log_loss:  # the user's own collective, on the group lowband was given
                    logged = loss.detach().clone()
                    dist.all_reduce(logged)
            algo.close()
            # numpy, pickled by value: a tensor on a torch.multiprocessing queue travels as a file
            # descriptor that the parent fetches from this process, which may have exited by then
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            out[log_loss][name] = flat.numpy()
        results.put((rank, out))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the test
        results.put((rank, traceback.format_exc()))


def _run(tmp_path) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    path = str(tmp_path / "store")
    procs = [ctx.Process(target=_worker, args=(r, 2, path, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank, value in got.items():
        assert isinstance(value, dict), f"rank {rank}:\n{value}"
    return got


def test_logging_all_reduce_beside_background_reductions_does_not_hang(tmp_path):
    import numpy as np

    got = _run(tmp_path)
    for rank in (0, 1):
        plain, logged = got[rank][False], got[rank][True]
        assert set(plain) == set(logged) == set(ALGOS)
        for name in ALGOS:
            assert np.array_equal(plain[name], logged[name]), (rank, name)
