"""`lowband plan`: every technique's predicted cost on a network, ranked by time to a token budget."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from lowband.comm import LinkSpec
from lowband.errors import ConfigError
from lowband.plan import seqpar_cost
from lowband.plan.cost import Technique, Workload, candidates, predict
from lowband.plan.penalty import ASSUMPTION as LOSS_ASSUMPTION
from lowband.plan.penalty import gap, token_multiplier

ASSUMPTIONS = [
    "compute: the per-worker rate you gave (--tokens-per-s, measured: `lowband probe` or "
    "benchmarks/gpu_step.py); with `--probe`, its workers' measured step times add the wait for "
    "the slowest worker at every sync (persistent and random spread; only the persistent part "
    "where the sync overlaps steps), else every worker takes the same time",
    "communication: the same formulas that charge `lowband train`'s emulated link (bytes exact; "
    "seconds = hops x latency + busiest uplink's bytes / bandwidth), no jitter, no loss; plus "
    "the real transport's own time per collective where measured (--transport, or --probe of "
    "an emulated link), which the emulation adds before the link's time",
    "--sites: every collective is a flat ring over all workers, so its hops cross the --inter "
    "link (an upper bound: no hierarchical reduction)",
    "DDP does not overlap its all-reduce with the backward pass (lowband's DDP waits after it)",
    "Streaming DiLoCo hides a fragment's reduction behind tau inner steps; the rest is exposed",
    "federated rules: every K steps a blocking star through rank 0: the participants' uploads "
    "(one fp32 vector, SCAFFOLD two, SCALLION/SCAFCOM the compressor's wire tensors) queue on the "
    "server's downlink, then it sends x (and c) to the others one after another; bytes per worker "
    "are the mean over workers (the server sends most); with partial participation only the "
    "participants' steps count towards the budget (ADMM-NR keeps all)",
    "gossip rules (D-PSGD, DFedSAM, DFedSAM-MGS): Q blocking exchanges per round with the graph's "
    "neighbours, each as long as the busiest worker's messages; a DFedSAM step costs two passes "
    "(SAM); memory beside the model and AdamW: federated 12 N (x and two gradient buffers), +8 N "
    "for SCAFFOLD's c and c_i, +8 N SCALLION/SCAFCOM's server moments, +4 N SCAFCOM's momentum; "
    "ADMM-NR 32 N and 4 N per worker on the server; gossip none (its exchange can peak at 12 N "
    "plus the neighbours' payloads)",
    "DADAO (`lowband dadao`) is not ranked: it solves smooth strongly convex problems with exact "
    "gradients on Poisson clocks, not a language model",
    "memory: the compiled bf16 step of `lowband train` on a GPU: fp32 parameters and AdamW "
    "moments (12 N bytes), +8 N for the DiLoCo family's outer copy and momentum or error buffer, "
    "plus the larger of autocast's bf16 weights (2 N) with the activations, 0.64 x (27.6 dim + "
    "9.28 ffn) bytes per token and layer (fitted to 9 H200 peaks of lowband's presets, within "
    "2.3%; 4 more, held out, within 5.2%), and the gradients (4 N); ffn = 4 x dim unless a preset "
    "or --ffn-dim says",
    LOSS_ASSUMPTION,
]


def add_model_args(p) -> None:
    """The model flags `_workload` reads, shared by `lowband plan` and `lowband simulate`."""
    p.add_argument("--model", default="125m", help="a preset (lowband models), or give --params")
    p.add_argument("--params", type=float, help="parameter count (instead of a preset)")
    p.add_argument("--layers", type=int, help="with --params: transformer blocks")
    p.add_argument("--dim", type=int, help="with --params: model width")
    p.add_argument("--ffn-dim", type=int, help="with --params: FFN width (default 4 x --dim)")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="predict every technique's speed, bytes and memory on your network",
        description=__doc__,
    )
    add_model_args(p)
    p.add_argument(
        "--tokens", type=float, required=False, default=1e9, help="token budget (default 1e9)"
    )
    p.add_argument("--workers", type=int, help="workers (or --sites)")
    p.add_argument("--sites", help="SITESxGPUS, e.g. 3x8: workers in sites")
    p.add_argument("--link", help="the link every worker sits behind, e.g. 1gbit:80ms")
    p.add_argument("--inter", help="with --sites: the link between sites")
    p.add_argument("--intra", help="with --sites: the link inside a site (reported only)")
    p.add_argument(
        "--link-map",
        help="a link per pair of workers (the JSON of `lowband train --link-map`; with --workers): "
        "collectives take the slowest pair, as lowband's emulation does",
    )
    p.add_argument("--tokens-per-s", type=float, help="measured compute rate per worker (tokens/s)")
    p.add_argument(
        "--transport",
        metavar="BANDWIDTH:LATENCY",
        help="the real transport's own time per collective under lowband's emulated link, as a "
        "link (per-hop latency, bandwidth), e.g. 8gbit:0.1ms: `lowband probe` measures it "
        "(emulation off); added to every collective's link time (default: none, or the probe's)",
    )
    p.add_argument(
        "--probe", type=Path, help="a network file from `lowband probe`: its link and compute rate"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument(
        "--rank",
        choices=("loss", "budget"),
        default="loss",
        help="loss: by predicted time to DDP's loss at the budget (measured gaps, extrapolated); "
        "budget: by time to the token budget, loss ignored (default: loss)",
    )
    p.add_argument(
        "--device-memory",
        type=float,
        default=140.0,
        metavar="GB",
        help="memory per GPU, GiB as the memory column (default 140: an H200's 141 GB); when the "
        "recommended step needs more, a sequence-parallel table follows",
    )
    p.add_argument(
        "--seq-parallel",
        metavar="D|SCHEME:D",
        help="show the sequence-parallel table at degree D (over the GPUs of a site, the --intra "
        "link), for every scheme or one of ulysses, ring, tokenring, hybrid",
    )
    p.add_argument("--top", type=int, default=12, help="rows to print")
    p.add_argument("--json", type=Path, help="write the whole plan here")
    p.set_defaults(fn=run)


def _read_probe(args) -> LinkSpec | None:
    """--probe FILE fills --workers, --tokens-per-s, --batch-size and --seq-len (those given
    explicitly win) and returns its measured link (None when --link or --sites describes it)."""
    try:
        net = json.loads(args.probe.read_text())
        s = net["summary"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"--probe {args.probe}: not a `lowband probe` network file ({e})"
        ) from None
    if args.tokens_per_s is None:
        args.tokens_per_s = float(s["tokens_per_s"])
        args.batch_size, args.seq_len = int(net["batch_size"]), int(net["seq_len"])
        times = [c.get("step_times_s") for c in net.get("compute", [])]
        if times and all(times) and s.get("mean_tokens_per_s"):
            args.probe_step_times = times  # `lowband plan` takes them with the mean rate
            args.probe_mean_tokens_per_s = float(s["mean_tokens_per_s"])
    transport = s.get("transport")
    if getattr(args, "transport", None) is None and transport and net.get("emulated_link"):
        # Only under emulation does the transport come on top of the link; on a real network
        # the probe's pairs measured the transport itself.
        args.transport = LinkSpec(
            bandwidth_bps=float(transport["bandwidth_bps"]), latency_s=float(transport["latency_s"])
        )
        q = transport.get("quantized")
        if q:  # the quantized all-reduce's own (docs/plan.md)
            args.quantized_transport = LinkSpec(
                bandwidth_bps=float(q["bandwidth_bps"]), latency_s=float(q["latency_s"])
            )
    if args.link is not None or args.sites is not None:
        return None
    if args.workers is None:
        args.workers = int(net["workers"])
    if not s.get("bandwidth_bps"):
        return None
    return LinkSpec(bandwidth_bps=float(s["bandwidth_bps"]), latency_s=float(s["latency_s"]))


def _workers_and_link(args, measured: LinkSpec | None) -> tuple[int, LinkSpec | None]:
    if measured is not None:
        return args.workers, measured
    if getattr(args, "link_map", None):
        from lowband.comm.link import LinkMap

        if args.link is not None or args.sites is not None:
            raise ConfigError("--link-map replaces --link and --sites: give one of them")
        if args.workers is None or args.workers < 1:
            raise ConfigError("--link-map needs --workers N (the ranks the map names)")
        links = LinkMap.load(args.link_map)
        links.check(args.workers)
        return args.workers, links.for_ranks(range(args.workers))
    if args.sites:
        try:
            sites, per = (int(x) for x in args.sites.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--sites must be SITESxGPUS, e.g. 3x8, got {args.sites!r}") from None
        if sites < 1 or per < 1:
            raise ConfigError(f"--sites must be positive, got {args.sites!r}")
        link = args.inter if sites > 1 else (args.intra or args.link)
        return sites * per, LinkSpec.parse(link)
    if args.workers is None or args.workers < 1:
        raise ConfigError("lowband plan needs --workers N (at least 1) or --sites SxG")
    return args.workers, LinkSpec.parse(args.link)


def _workload(args) -> Workload:
    if args.tokens_per_s is None or not args.tokens_per_s > 0:
        raise ConfigError(
            "lowband plan needs the measured compute rate per worker: --tokens-per-s "
            "(from `lowband probe`, or benchmarks/gpu_step.py: e.g. 466000 for 125m on an H200)"
        )
    if not (args.tokens > 0 and math.isfinite(args.tokens)):
        raise ConfigError(f"--tokens must be a positive number, got {args.tokens}")
    if args.params is not None:
        if args.layers is None or args.dim is None or args.params < 1:
            raise ConfigError("--params needs --layers and --dim")
        if args.ffn_dim is not None and args.ffn_dim < 1:
            raise ConfigError(f"--ffn-dim must be positive, got {args.ffn_dim}")
        model, params, layers, dim = None, int(args.params), args.layers, args.dim
        ffn = args.ffn_dim
    else:
        from lowband.models import PRESETS, build_model

        if args.model not in PRESETS:
            raise ConfigError(
                f"unknown model preset {args.model!r}; choose one of: {', '.join(PRESETS)}"
            )
        model = build_model(args.model, device="meta")
        cfg = PRESETS[args.model]
        params, layers, dim, ffn = model.num_params(), cfg.n_layers, cfg.dim, cfg.ffn_dim
    transport = getattr(args, "transport", None)
    if isinstance(transport, str):
        try:
            transport = LinkSpec.parse(transport)
        except ConfigError:
            transport = None
        if transport is None or transport.jitter_s or transport.loss or transport.noise:
            raise ConfigError(
                f"--transport {args.transport!r}: give BANDWIDTH:LATENCY, e.g. 8gbit:0.1ms"
            )
    return Workload(
        params=params, layers=layers, dim=dim, batch_size=args.batch_size, seq_len=args.seq_len,
        tokens=int(args.tokens), tokens_per_s=args.tokens_per_s, ffn_dim=ffn, model=model,
        transport=transport,
        quantized_transport=getattr(args, "quantized_transport", None),
    )  # fmt: skip


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _seq_parallel(args, w: Workload, n: int, link, needed: int) -> dict | None:
    """The sequence-parallel table (lowband.plan.seqpar_cost), when the recommended step needs
    more than --device-memory or --seq-parallel asks: its printed lines and its JSON."""
    if not (args.device_memory > 0 and math.isfinite(args.device_memory)):
        raise ConfigError(
            f"--device-memory must be a positive number of GB, got {args.device_memory}"
        )
    forced = seqpar_cost.parse_degree(args.seq_parallel) if args.seq_parallel else None
    device_memory = args.device_memory * 2**30
    if forced is None and needed <= device_memory:
        return None
    site_gpus, site_link = n, link
    if args.sites:
        site_gpus = int(args.sites.lower().split("x")[1])
        site_link = LinkSpec.parse(args.intra) if args.intra else None
    if args.params is None:
        from lowband.models import PRESETS

        c = PRESETS[args.model]
        heads, assumed = seqpar_cost.Heads(c.n_heads, c.n_kv_heads, c.head_dim), ""
    else:
        hd = 128 if args.dim % 128 == 0 else args.dim
        heads = seqpar_cost.Heads(args.dim // hd, args.dim // hd, hd)
        assumed = f"; heads assumed: {heads.heads} of {hd}, no GQA (--params)"
    rows = seqpar_cost.section(
        w, heads, site_link, workers=n, site_gpus=site_gpus, device_memory=device_memory,
        forced=forced,
    )  # fmt: skip
    best = seqpar_cost.advice(rows)
    why = (
        f"the recommended step needs {needed / 2**30:.1f} GB per GPU, more than --device-memory "
        f"{args.device_memory:g}"
        if needed > device_memory
        else f"--seq-parallel {args.seq_parallel}"
    )
    lines = [
        f"sequence parallel ({why}): each sequence of {w.seq_len:,} tokens sharded over d GPUs "
        f"of a site, link {site_link or 'none'}, --algo ddp across groups (its all-reduce comes "
        f"on top); memory eager (no compile with --seq-parallel){assumed}",
        "",
        *seqpar_cost.table(rows),
    ]
    if not rows:
        lines.append(f"no degree in {seqpar_cost.DEGREES} fits in a site of {site_gpus} GPUs")
    elif best is None:
        lines.append("\nnone fits: a larger d, a smaller --batch-size or activation checkpointing")
    else:
        lines.append(
            f"\nadvice: {best.scheme} over d = {best.degree} (the smallest d that fits, the "
            f"fastest scheme there): {best.memory_bytes / 2**30:.1f} GB per GPU, "
            f"{1e3 * best.exposed_s:.1f} ms exposed per step\n"
            f"  lowband train --algo ddp --seq-parallel {best.scheme} --cp {best.degree}"
        )
    return {
        "lines": lines,
        "device_memory_bytes": device_memory,
        "needed_bytes": needed,
        "link": str(site_link),
        "heads": dataclasses.asdict(heads),
        "rows": [p.row() for p in rows],
        "advice": best.row() if best else None,
    }


def _ranked(w: Workload, n: int, link, rank: str):
    """Every candidate's prediction, best first (by time to the budget, or to DDP's loss with
    rank "loss"; within 2% of the fastest, the smallest H, the least stale, then the fewest
    bytes), and each one's time to DDP's loss by id."""
    preds = [predict(w, t, n, link) for t in candidates()]
    to_loss = {id(p): p.time_to_budget_s * token_multiplier(gap(p.technique)) for p in preds}

    def key(p) -> float:
        return to_loss[id(p)] if rank == "loss" else p.time_to_budget_s

    preds.sort(key=key)
    near = [p for p in preds if key(p) <= 1.02 * key(preds[0])]
    best = min(near, key=lambda p: (p.technique.sync_every, p.bytes_per_step))
    preds.remove(best)
    return [best, *preds], to_loss, key


def _print_workload(w: Workload, n: int, link) -> None:
    print(
        f"lowband plan: {w.params / 1e6:,.0f}M parameters, {n} workers, link {link or 'none'}, "
        f"{w.tokens:,.0f} tokens, {w.tokens_per_s:,.0f} tokens/s per worker "
        f"({1e3 * w.compute_s:.0f} ms per step of {w.step_tokens:,} tokens)"
    )
    if w.transport is not None:
        print(
            f"transport per collective: {1e6 * w.transport.latency_s:.0f} us per hop, "
            f"{w.transport.bandwidth_bps / 1e9:.2f} Gbit/s, before the link's time"
        )
    if w.quantized_transport is not None:
        q = w.quantized_transport
        print(
            f"transport of the quantized all-reduce: {1e6 * q.latency_s:.0f} us per hop, "
            f"{q.bandwidth_bps / 1e9:.2f} Gbit/s, before the link's time"
        )
    if w.step_times is not None:
        print(
            f"stragglers: step times of {len(w.step_times)} workers measured; each sync waits "
            f"for the slowest (DDP: {1e3 * predict(w, Technique('ddp'), n, link).straggler_s:.1f} "
            "ms per step)"
        )
    print()


def _print_table(preds, to_loss, top: int) -> None:
    head = (
        f"{'technique':<50} {'step':>9} {'exposed':>9} {'util':>5} {'MB/step':>9} {'memory':>8} "
        f"{'to budget':>10} {'loss gap':>8} {'to DDP loss':>11}"
    )
    print(head)
    print("-" * len(head))
    for p in preds[:top]:
        print(
            f"{p.technique.label():<50} {1e3 * p.step_s:>7.0f}ms {1e3 * p.exposed_s:>7.0f}ms "
            f"{100 * p.utilisation:>4.0f}% {p.bytes_per_step / 1e6:>9.2f} "
            f"{p.memory_bytes / 2**30:>6.1f}GB {_duration(p.time_to_budget_s):>10} "
            f"{100 * gap(p.technique).relative:>+7.0f}% {_duration(to_loss[id(p)]):>11}"
        )


def run(args: argparse.Namespace) -> int:
    measured = _read_probe(args) if args.probe is not None else None
    n, link = _workers_and_link(args, measured)
    w = _workload(args)
    if getattr(args, "probe_step_times", None):  # the workers' mean rate and their spread
        w = dataclasses.replace(
            w, tokens_per_s=args.probe_mean_tokens_per_s, step_times=args.probe_step_times
        )
    preds, to_loss, key = _ranked(w, n, link, args.rank)
    best = preds[0]
    sp = _seq_parallel(args, w, n, link, best.memory_bytes)
    _print_workload(w, n, link)
    _print_table(preds, to_loss, args.top)
    ddp = next(p for p in preds if p.technique.algo == "ddp" and p.technique.bits == 32)
    ranked_by = "DDP's loss at the budget" if args.rank == "loss" else "the token budget"
    print(
        f"\nrecommended (by time to {ranked_by}): {best.technique.label()}: "
        f"{100 * best.utilisation:.0f}% utilisation, {_duration(best.time_to_budget_s)} to the "
        f"budget, {_duration(to_loss[id(best)])} to DDP's loss "
        f"({key(ddp) / key(best):.1f}x faster than DDP)\n"
        f"  lowband train {' '.join(best.technique.flags())}"
    )
    if sp is not None:
        print("\n" + "\n".join(sp.pop("lines")))
    print("\nassumptions:")
    for a in ASSUMPTIONS:
        print(f"  - {a}")
    if args.json:
        rows = []
        for p in preds:
            g = gap(p.technique)
            rows.append(
                {
                    **p.row(),
                    "loss_gap": g.relative,
                    "loss_gap_source": g.source,
                    "loss_gap_measured": g.measured,
                    "time_to_ddp_loss_s": to_loss[id(p)],
                }
            )
        args.json.write_text(
            json.dumps(
                {
                    "recommended": best.technique.label(),
                    "rank": args.rank,
                    "workers": n,
                    "link": str(link),
                    "transport": None if w.transport is None else str(w.transport),
                    "quantized_transport": None
                    if w.quantized_transport is None
                    else str(w.quantized_transport),
                    "step_times": w.step_times,
                    "rows": rows,
                    "seq_parallel": sp,
                    "assumptions": ASSUMPTIONS,
                },
                indent=1,
            )  # fmt: skip
        )
    return 0


def add_probe_parser(sub) -> None:
    from lowband.plan.probe import __doc__ as probe_doc

    p = sub.add_parser(
        "probe",
        help="measure latency, bandwidth and compute between your workers",
        description=probe_doc,
    )
    p.add_argument(
        "--workers", type=int, default=2, help="local workers (torchrun decides under it)"
    )
    p.add_argument(
        "--link", help="emulated link, as for `lowband train` (default: the real network)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--model", default="1m", help="the preset whose training step is timed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--megabytes", type=float, default=4.0, help="size of the bandwidth transfers")
    p.add_argument(
        "--pings",
        type=int,
        default=7,
        help="round trips per pair for the latency; all-reduces per size for the transport",
    )
    p.add_argument(
        "--steps", type=int, default=10, help="timed training steps per worker (at once on all)"
    )
    p.add_argument("--out", default="network.json", help="the network file to write")
    p.set_defaults(fn=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from lowband.launch import launch_local, launch_torchrun, under_torchrun
    from lowband.models import PRESETS
    from lowband.plan.probe import ProbeConfig, describe, probe_worker
    from lowband.train.rundir import RunDir

    if args.workers < 1 or args.pings < 1 or args.steps < 1 or not args.megabytes > 0:
        raise ConfigError("--workers, --pings, --steps and --megabytes must be positive")
    if args.model not in PRESETS:
        raise ConfigError(
            f"unknown model preset {args.model!r}; choose one of: {', '.join(PRESETS)}"
        )
    LinkSpec.parse(args.link)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    cfg = ProbeConfig(
        workers=args.workers, link=args.link, device=args.device, model=args.model,
        batch_size=args.batch_size, seq_len=args.seq_len, pings=args.pings,
        megabytes=args.megabytes, steps=args.steps, out=str(out.resolve()),
    )  # fmt: skip
    if under_torchrun():
        launch_torchrun(cfg, out.parent, False, worker=probe_worker)
    else:
        launch_local(cfg, RunDir(out.parent), False, worker=probe_worker)
    if out.exists():
        network = json.loads(out.read_text())
        network["path"] = str(out)
        print(describe(network))
    return 0
