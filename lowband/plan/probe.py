"""`lowband probe`: measure the network between workers and each worker's compute rate.

Run it where you will train: locally (`--workers N`, optionally over an emulated `--link`) or one
process per host under torchrun. For every pair of workers (a, b), one pair at a time:
  latency    a sends b one 4-byte tensor and b sends it back, `--pings` times; one-way latency is
             half the median round trip, jitter the spread (standard deviation) of the halves
  bandwidth  a sends b a `--megabytes` tensor and b answers with 4 bytes; bandwidth is the bytes
             over (elapsed - one round trip), then the same from b to a
then, with the link emulation off, the transport itself:
  transport  all workers all-reduce (average) one value, then a `--megabytes` tensor, `--pings`
             times each, from a barrier; the medians give the transport's per-hop latency (the
             small one's time over its 2 (n - 1) ring hops) and bandwidth (the busiest worker's
             bytes over the rest of the large one's time): what every collective costs before the
             emulated link's time starts (lowband.comm.Comm), Gloo and the Python around it
and then `--steps` timed training steps of `--model` at `--batch-size` x `--seq-len` (after one
warm-up step), each started on all workers at once (an untimed barrier, as after a synchronous
step): each step's time (their spread across workers is what a sync waits for) and tokens/s, the
rate `lowband plan` takes. The network file (JSON)
holds per-pair latency, jitter and bandwidth both ways, the transport, per-worker step times,
tokens/s and peak memory, and a summary (the slowest pair's bandwidth, the largest latency, the
slowest worker's rate, the workers' mean rate, the transport) that `lowband plan --probe FILE`
uses. Under `--link` emulation the probe measures what the emulation sets (tested within 10%).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from lowband.comm import Comm, get_codec, quantized_all_reduce
from lowband.comm.accounting import all_reduce_traffic


@dataclasses.dataclass(kw_only=True)
class ProbeConfig:
    workers: int = 2
    link: str | None = None
    device: str = "auto"
    threads: int = 1
    seed: int = 0
    model: str = "1m"
    batch_size: int = 8
    seq_len: int = 128
    pings: int = 7
    megabytes: float = 4.0
    steps: int = 10
    out: str = "network.json"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ProbeConfig:
        return cls(**d)


def _pair(comm: Comm, a: int, b: int, cfg: ProbeConfig) -> dict | None:
    """Measure the pair (a, b); the result on a, None elsewhere."""
    me = comm.rank
    if me not in (a, b):
        return None
    other = b if me == a else a
    small = torch.zeros(1, device=comm.device)
    halves = []
    for _ in range(cfg.pings):
        t0 = time.perf_counter()
        if me == a:
            comm.send(small, other)
            comm.recv(small, other)
        else:
            comm.recv(small, other)
            comm.send(small, other)
        halves.append((time.perf_counter() - t0) / 2)
    latency = statistics.median(halves)
    numel = max(1, int(cfg.megabytes * 1e6 / 4))
    bulk = torch.zeros(numel, device=comm.device)
    # Each direction is timed at its sender, from the send to the receiver's one-value reply:
    # transmission plus two latencies. b then tells a its figure.
    rate = torch.zeros(1, dtype=torch.float64, device=comm.device)
    for src, dst in ((a, b), (b, a)):
        if me == src:
            t0 = time.perf_counter()
            comm.send(bulk, dst)
            comm.recv(small, dst)
            elapsed = time.perf_counter() - t0
            rate.fill_(numel * 4 * 8 / max(elapsed - 2 * latency, 1e-9))
            if me == a:
                rates = {f"{a}->{b}": rate.item()}
        else:
            comm.recv(bulk, src)
            comm.send(small, src)
    if me != a:
        comm.send(rate, a)
        return None
    comm.recv(rate, b)
    rates[f"{b}->{a}"] = rate.item()
    return {
        "a": a,
        "b": b,
        "latency_s": latency,
        "jitter_s": statistics.pstdev(halves),
        "bandwidth_bps": rates,
    }


def _transport(bare: Comm, cfg: ProbeConfig) -> dict | None:
    """The real transport's time per all-reduce with the emulation off (module docstring), on
    this worker (`bare`: the group without its emulated link): the median of `--pings`
    all-reduces of one value and of `--megabytes`, each started from a barrier. None for one
    worker."""
    if bare.size == 1:
        return None
    bare.barrier()
    times = {}
    for numel in (1, max(1, int(cfg.megabytes * 1e6 / 4))):
        x = torch.zeros(numel, device=bare.device)
        bare.all_reduce(x, op="avg")  # warm-up: buffers and connections
        runs = []
        for _ in range(cfg.pings):
            bare.barrier()
            t0 = time.perf_counter()
            bare.all_reduce(x, op="avg")
            runs.append(time.perf_counter() - t0)
        times[numel] = statistics.median(runs)
    # The quantized all-reduce (DiLoCo, Streaming DiLoCo, CO2; fp32 codec) is an all-to-all then
    # an all-gather: other Gloo collectives, other host staging on a GPU (the H2D copies of
    # every result come after the transfer, inside the time Comm counts), so timed itself. Its
    # `seconds` are what Comm counts (the transport part, as a run's comm_time); `local` the rest
    # (padding, encode, decode, sum; on a GPU the D2H staging, which waits for queued kernels).
    quantized: dict[int, tuple[float, float]] = {}
    codec = get_codec(32)
    for numel in (bare.size, max(bare.size, int(cfg.megabytes * 1e6 / 4))):
        x = torch.zeros(numel, device=bare.device)
        quantized_all_reduce(bare, x, codec)  # warm-up
        comm_s, local_s = [], []
        for _ in range(cfg.pings):
            bare.barrier()
            c0, t0 = bare.stats.seconds, time.perf_counter()
            quantized_all_reduce(bare, x, codec)
            if bare.device.type == "cuda":
                torch.cuda.synchronize(bare.device)
            total, counted = time.perf_counter() - t0, bare.stats.seconds - c0
            comm_s.append(counted)
            local_s.append(total - counted)
        quantized[numel] = (statistics.median(comm_s), statistics.median(local_s))
    return {
        "numel": list(times),
        "seconds": list(times.values()),
        "quantized": {
            "numel": list(quantized),
            "seconds": [c for c, _ in quantized.values()],
            "local_seconds": [loc for _, loc in quantized.values()],
        },
    }


def _fit(
    small: float, large: float, small_rounds: int, large_rounds: int, large_bytes: int
) -> dict:
    """A link from two timed sizes: per-hop latency = the small one's time over its ring hops,
    bandwidth = the large one's busiest-uplink bytes over the rest of its time."""
    latency = small / small_rounds
    rest = max(large - large_rounds * latency, 1e-9)
    return {"latency_s": latency, "bandwidth_bps": large_bytes * 8 / rest, "small_s": small,
            "bulk_s": large}  # fmt: skip


def transport_link(measured: list[dict], n: int) -> dict:
    """The transport as a link from the workers' timings (`_transport`): the median over workers
    of each size's time, fitted by `_fit` over the all-reduce's hops and bytes."""
    (one, bulk) = measured[0]["numel"]
    small, large = (statistics.median(m["seconds"][i] for m in measured) for i in (0, 1))
    traffic = all_reduce_traffic(bulk, 4, 0, n)
    out = {
        **_fit(small, large, all_reduce_traffic(one, 4, 0, n).rounds, traffic.rounds,
               traffic.critical_bytes),
        "bulk_bytes": 4 * bulk,
    }  # fmt: skip
    if all("quantized" in m for m in measured):
        out["quantized"] = quantized_link([m["quantized"] for m in measured], n)
    return out


def quantized_link(measured: list[dict], n: int) -> dict:
    """The quantized all-reduce's transport as a link (`_transport`), fitted by `_fit` over the
    all-to-all's and the all-gather's hops and busiest-uplink bytes
    (lowband.plan.cost.quantized_reduce_traffic): the median over workers of the time Comm
    counts; `local_s` the median local work of the large one, for the record."""
    from lowband.plan.cost import quantized_reduce_traffic

    (one, bulk) = measured[0]["numel"]
    small, large, local = (
        statistics.median(m[key][i] for m in measured)
        for key, i in (("seconds", 0), ("seconds", 1), ("local_seconds", 1))
    )
    traffic = quantized_reduce_traffic(bulk, n, 32)
    fitted = _fit(
        small, large, sum(t.rounds for t in quantized_reduce_traffic(one, n, 32)),
        sum(t.rounds for t in traffic), sum(t.critical_bytes for t in traffic),
    )  # fmt: skip
    return {**fitted, "bulk_bytes": 4 * bulk, "local_s": local}


def _compute(cfg: ProbeConfig, device: torch.device, together=lambda: None) -> dict:
    from lowband.models import build_model
    from lowband.train.compute import adamw

    model = build_model(cfg.model, seed=cfg.seed, device=device)
    opt = adamw(model, lr=1e-4, weight_decay=0.0, device=device)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, 256, (cfg.batch_size, cfg.seq_len + 1), generator=g).to(device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def step() -> None:
        with autocast:
            loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(cfg.steps):
        together()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    step_s = sum(times) / cfg.steps
    return {
        "device": str(device),
        "step_s": step_s,
        "step_times_s": times,
        "tokens_per_s": cfg.batch_size * cfg.seq_len / step_s,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
    }


def probe_worker(
    cfg: ProbeConfig, comm: Comm, run, device: torch.device, resume: bool = False
) -> dict:
    """One worker of `lowband probe` (lowband.launch.local runs it on every worker)."""
    out = Path(cfg.out)
    n = comm.size
    pairs = [p for a in range(n) for b in range(a + 1, n) if (p := _pair(comm, a, b, cfg))]
    bare = Comm(comm.group, None, device=comm.device) if n > 1 else comm  # emulation off
    transport = _transport(bare, cfg)
    compute = {"rank": comm.rank, **_compute(cfg, device, bare.barrier)}
    part = out.with_name(f".{out.name}.rank{comm.rank}")
    part.write_text(json.dumps({"pairs": pairs, "compute": compute, "transport": transport}))
    if n > 1:
        comm.barrier()
    if comm.rank == 0:
        parts = [json.loads(out.with_name(f".{out.name}.rank{r}").read_text()) for r in range(n)]
        all_pairs = [p for x in parts for p in x["pairs"]]
        transport = transport_link([x["transport"] for x in parts], n) if n > 1 else None
        network = {
            "workers": n,
            "emulated_link": cfg.link,
            "model": cfg.model,
            "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len,
            "pairs": all_pairs,
            "compute": [x["compute"] for x in parts],
            "transport": transport,
            "summary": {
                "bandwidth_bps": min(
                    (v for p in all_pairs for v in p["bandwidth_bps"].values()), default=None
                ),
                "latency_s": max((p["latency_s"] for p in all_pairs), default=None),
                "tokens_per_s": min(x["compute"]["tokens_per_s"] for x in parts),
                "mean_tokens_per_s": cfg.batch_size
                * cfg.seq_len
                / statistics.mean(x["compute"]["step_s"] for x in parts),
                "transport": transport
                and {
                    **{k: transport[k] for k in ("latency_s", "bandwidth_bps")},
                    **(
                        {
                            "quantized": {
                                k: transport["quantized"][k] for k in ("latency_s", "bandwidth_bps")
                            }
                        }
                        if "quantized" in transport
                        else {}
                    ),
                },
            },
        }
        out.write_text(json.dumps(network, indent=1))
        for r in range(n):
            out.with_name(f".{out.name}.rank{r}").unlink(missing_ok=True)
    return {}


def describe(network: dict) -> str:
    """The readable matrix: latency (ms) and bandwidth (Mbit/s) per pair, compute per worker."""
    n = network["workers"]
    lines = [
        f"{n} workers"
        + (f", emulated link {network['emulated_link']}" if network.get("emulated_link") else "")
    ]
    if network["pairs"]:
        lines.append(f"{'pair':>8} {'latency':>10} {'jitter':>9} {'a->b':>12} {'b->a':>12}")
        for p in network["pairs"]:
            a, b = p["a"], p["b"]
            bw = p["bandwidth_bps"]
            lines.append(
                f"{f'{a}-{b}':>8} {1e3 * p['latency_s']:>8.2f}ms {1e3 * p['jitter_s']:>7.2f}ms "
                f"{bw[f'{a}->{b}'] / 1e6:>8.1f}Mbit {bw[f'{b}->{a}'] / 1e6:>8.1f}Mbit"
            )
    for c in network["compute"]:
        lines.append(
            f"worker {c['rank']} ({c['device']}): {c['tokens_per_s']:,.0f} tokens/s of {network['model']} "
            f"at {network['batch_size']} x {network['seq_len']} ({1e3 * c['step_s']:.1f} ms a step)"
        )
    t = network.get("transport")
    if t:
        lines.append(
            f"transport (emulation off): all-reduce of 4 bytes {1e3 * t['small_s']:.2f} ms, of "
            f"{t['bulk_bytes'] / 1e6:g} MB {1e3 * t['bulk_s']:.2f} ms: "
            f"{1e6 * t['latency_s']:.0f} us per hop, {t['bandwidth_bps'] / 1e9:.2f} Gbit/s"
        )
        q = t.get("quantized")
        if q:
            lines.append(
                f"transport of the quantized all-reduce (all-to-all + all-gather, fp32): of "
                f"{q['bulk_bytes'] / 1e6:g} MB {1e3 * q['bulk_s']:.2f} ms counted as communication "
                f"(+ {1e3 * q['local_s']:.2f} ms local): {1e6 * q['latency_s']:.0f} us per hop, "
                f"{q['bandwidth_bps'] / 1e9:.2f} Gbit/s"
            )
    s = network["summary"]
    if s["bandwidth_bps"] is not None:
        lines.append(
            f"slowest pair: {s['bandwidth_bps'] / 1e6:,.1f} Mbit/s, largest latency "
            f"{1e3 * s['latency_s']:.2f} ms -> lowband plan --probe {network.get('path', 'FILE')}"
        )
    return "\n".join(lines)
