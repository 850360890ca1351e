"""`lowband simulate`: play the techniques on a large network, with stragglers and failures, and
show where each stops scaling (lowband.plan.simulate; docs/plan.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from datetime import UTC
from pathlib import Path

from lowband.comm import LinkSpec
from lowband.comm.link import LinkMap
from lowband.errors import ConfigError
from lowband.plan.command import _duration, _read_probe, _workload, add_model_args
from lowband.plan.cost import (
    FEDERATED,
    FEDERATED_CANDIDATES,
    GOSSIP,
    GOSSIP_CANDIDATES,
    Technique,
    candidates,
    predict,
)
from lowband.plan.simulate import Failures, Network, SimResult, Straggler, simulate

MEASURED = [
    "compute rate per worker: --tokens-per-s (measured: `lowband probe`, benchmarks/gpu_step.py)",
    "bytes and seconds of every collective: lowband.plan.cost.sync_costs, the formulas that "
    "charge `lowband train`'s emulated link (bytes exact against real runs; seconds within 10% "
    "at 2-4 workers: benchmarks/RESULTS.md, tests/test_simulate.py)",
]
MODELLED = [
    "stragglers: per-worker per-step compute = t_c x X, X i.i.d. with mean 1 (--straggler); no "
    "persistently slow worker, no correlation between steps",
    "collectives over a group take its slowest pair's link (flat ring, LinkMap.for_ranks); "
    "--hierarchical: a what-if lowband does not implement (inside each site, then across sites "
    "on G parallel rings)",
    "links carry one collective at a time with no jitter or loss; DDP does not overlap its "
    "all-reduce with the backward pass; Streaming DiLoCo hides a fragment behind tau steps",
    "NoLoCo: groups drawn as lowband.algorithms.noloco.noloco_groups (--seed, the round) over "
    "the live workers; each group exchanges on its own clock and link (its slowest pair), so a "
    "straggler or a failure delays only its group; --hierarchical does not apply (point to point)",
    "CO2 (delay 1): round r's all-reduce runs behind round r+1's inner steps; a worker blocks at "
    "round r+1's end only for what is left of it; the last round's reduction is waited for "
    "(one pipeline drain, min(H t_c, reduction), beyond the plan's steady state)",
    "failures: exponential up-times (--failure-rate per worker-hour), --recovery-s down, "
    "detected after --detect-s; a failure before a collective drops that worker's round, one "
    "during a collective discards the round for everyone (torchft's should_commit); a recovered "
    "worker heals from a live peer (same site if any) at the link's speed while all stall "
    "(measured stall 0.88-1.21x the ideal transfer, RESULTS.md 'Elastic recovery')",
    "extrapolated: times marked * stopped at --max-steps, --max-days or after 1,000 rounds in "
    "a row discarded by failures, and scale the rest of the budget at the simulated rate; "
    "'never': no round committed. DiLoCo-family times are rounded up to a whole round",
    "federated rules: each round's clients drawn as lowband.algorithms.federated.participants "
    "(--seed, the round) over the live workers; the server (the lowest live rank) waits for "
    "them only, then every worker waits for its downlink; bytes and seconds cost.star_exchange's "
    "for the round's real draw, on the slowest pair; utilisation counts the participants' steps "
    "only (the others' are discarded, ADMM-NR keeps them), so with partial participation it is "
    "the plan's times the share drawn",
    "gossip rules: the graph of lowband.decentral.topology over the round's live workers; each "
    "gossip step ends at the latest of a worker's and its in-neighbours' clocks plus "
    "cost.gossip_exchange's step on its slowest neighbour's link (per-worker clocks: a straggler "
    "reaches one hop further per gossip step); DFedSAM's step is two passes; a failed neighbour "
    "is waited for until detected, then dropped for the round",
    "loss is NOT modelled: time to a token budget, not to a loss (see `lowband plan`)",
]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate the techniques on a large network with stragglers and failures",
        description=__doc__,
    )
    add_model_args(p)
    p.add_argument("--tokens", type=float, default=1e9, help="token budget (default 1e9)")
    p.add_argument("--tokens-per-s", type=float, help="measured compute rate per worker (tokens/s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--workers", type=int, help="workers behind --link (or --sites, --link-map)")
    p.add_argument("--sites", help="SITESxGPUS, e.g. 3x333: workers in sites")
    p.add_argument("--link", help="with --workers: the link every worker sits behind")
    p.add_argument("--intra", help="with --sites: the link inside a site")
    p.add_argument("--inter", help="with --sites: the link between sites")
    p.add_argument("--link-map", type=Path, help="a per-pair link file (as lowband train's)")
    p.add_argument(
        "--probe", type=Path, help="a `lowband probe` network file: its workers, link and rate"
    )
    p.add_argument(
        "--hierarchical", action="store_true", help="with sites: reduce in-site, then across"
    )
    p.add_argument(
        "--straggler", default="none", help="none, lognormal:SIGMA, or a file of step times (s)"
    )
    p.add_argument("--failure-rate", type=float, default=0.0, help="failures per worker per hour")
    p.add_argument("--recovery-s", type=float, default=120.0, help="a failed worker's down time")
    p.add_argument("--detect-s", type=float, default=5.0, help="time to notice a failure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", help="also simulate these worker counts, e.g. 8,64,256,1000")
    p.add_argument(
        "--technique",
        action="append",
        metavar="SPEC",
        help="repeatable: ddp[,bits=8] | diloco,H=100[,bits=4|compress=topk:0.01:2] | "
        "streaming,H=100,P=4,tau=12[,bits=4|compress=...] | noloco,H=100[,g=2,bits=16] | "
        "co2,H=100[,bits=4] | federated, named by --algo as `lowband plan` lists them: fedavg, "
        "fedprox, scaffold, scallion, scafcom, admm-nr, each K=100[,participation=0.5]"
        "[,compressor=randk:0.05] | gossip: dpsgd, dfedsam, dfedsam-mgs, each H=100"
        "[,topology=ring|exponential|...,bits=16,Q=4 (dfedsam-mgs)]. Default: DDP and the plan's "
        "best of each family (DiLoCo, Streaming DiLoCo, SparseLoCo, NoLoCo, CO2, federated, "
        "gossip)",
    )
    p.add_argument("--max-steps", type=int, default=200_000, help="then extrapolate")
    p.add_argument("--max-days", type=float, default=90.0, help="simulated; then extrapolate")
    p.add_argument("--json", type=Path, help="write every result here")
    p.add_argument("--plot", type=Path, help="PNG: utilisation and time to budget against N")
    p.add_argument(
        "--html", type=Path, help="a report page: the tables, the plot and every assumption"
    )
    p.set_defaults(fn=run)


def _parse_star_or_gossip(spec: str, algo: str, rest: list[str]) -> Technique:
    """`fedavg,K=10,participation=0.5` or `dfedsam-mgs,H=10,topology=exponential,Q=4`: the plan's
    candidate of that rule (cost.FEDERATED_CANDIDATES, GOSSIP_CANDIDATES: its compressor, options,
    bf16 gossip, Q = 4), with the given knobs."""
    gossip = algo in GOSSIP
    pool = GOSSIP_CANDIDATES if gossip else FEDERATED_CANDIDATES
    kw: dict = {}
    keys = ({"h", "k", "topology", "bits"} | ({"q"} if algo == "dfedsam-mgs" else set())) if gossip \
        else {"h", "k", "participation"} | ({"compressor"} if algo in ("scallion", "scafcom") else set())  # fmt: skip
    for item in rest:
        key, _, value = item.partition("=")
        key = key.strip().lower()
        value = value.strip()
        try:
            if key not in keys:
                raise ValueError
            if key in ("h", "k", "bits", "q"):
                field = {"h": "sync_every", "k": "sync_every", "bits": "bits", "q": "gossip_steps"}
                kw[field[key]] = int(value)
                if kw[field[key]] < 1:
                    raise ValueError
                if key == "bits" and kw["bits"] != 32:
                    from lowband.comm import get_codec

                    get_codec(kw["bits"])
            elif key == "participation":
                kw["participation"] = float(value)
                if not 0.0 < kw["participation"] <= 1.0:
                    raise ValueError
            elif key == "topology":
                from lowband.decentral.topology import check_spec

                check_spec(value)
                kw["topology"] = value
            else:
                from lowband.algorithms.scaffold import get_compressor

                get_compressor(value)
                kw["compressor"] = value
        except (ValueError, ConfigError, KeyError):
            takes = ", ".join(sorted(k.upper() if len(k) == 1 else k for k in keys))
            raise ConfigError(
                f"--technique {spec!r}: bad {item!r} ({algo} takes {takes})"
            ) from None
    base = next(t for t in pool if t.algo == algo)
    return dataclasses.replace(base, **kw)


def parse_technique(spec: str) -> Technique:
    """`diloco,H=100,bits=4` -> Technique("diloco", sync_every=100, bits=4); the federated and
    gossip rules by their --algo names (as `lowband plan` lists them: `fedavg,K=100`,
    `dfedsam-mgs,H=100,topology=exponential,Q=4`), starting from the plan's candidate."""
    name, *rest = [x.strip() for x in spec.split(",")]
    star = {a: a for a in (*FEDERATED, *GOSSIP)} | {"d-psgd": "dpsgd"}
    if name.lower() in star:
        return _parse_star_or_gossip(spec, star[name.lower()], rest)
    algo = {
        "ddp": "ddp", "diloco": "diloco", "streaming": "streaming-diloco", "noloco": "noloco",
        "co2": "co2",
    }.get(name.lower())  # fmt: skip
    keys = {"h": "sync_every", "p": "fragments", "tau": "overlap", "bits": "bits",
            "g": "group_size"}  # fmt: skip
    if algo is None:
        raise ConfigError(
            f"--technique {spec!r}: start with ddp, diloco, streaming, noloco, co2, "
            f"{', '.join(FEDERATED)} or {', '.join(GOSSIP)}"
        )
    kw: dict = {}
    for item in rest:
        key, _, value = item.partition("=")
        key = key.strip().lower()
        try:
            if key == "compress":
                from lowband.comm.sparse import TopK

                TopK.parse(value)
                kw["compress"] = value
            elif key in keys:
                kw[keys[key]] = int(value)
                if kw[keys[key]] < (0 if key == "tau" else 1):
                    raise ValueError
            else:
                raise ValueError
        except (ValueError, ConfigError):
            raise ConfigError(
                f"--technique {spec!r}: bad {item!r} (H=, P=, tau=, g=, bits= take integers; "
                "compress=topk:FRACTION:BITS)"
            ) from None
    allowed = {
        "ddp": {"bits"}, "noloco": {"sync_every", "group_size", "bits"},
        "co2": {"sync_every", "bits"},
    }.get(algo)  # fmt: skip
    if allowed is not None and set(kw) - allowed:
        takes = {"ddp": "bits=", "noloco": "H=, g= and bits=", "co2": "H= and bits="}[algo]
        raise ConfigError(f"--technique {spec!r}: {algo} takes only {takes}")
    if algo == "noloco":
        kw.setdefault("bits", 16)  # the plan's NoLoCo: parameters in bf16
        if kw.get("group_size", 2) < 2:
            raise ConfigError(f"--technique {spec!r}: g must be at least 2")
    if algo == "co2":
        kw.setdefault("bits", 4)
    if algo == "streaming-diloco":
        kw.setdefault("fragments", 4)
        kw.setdefault("overlap", 1)
    return Technique(algo, **kw)


def _sites(args) -> tuple[int, int]:
    try:
        s, g = (int(x) for x in args.sites.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--sites must be SITESxGPUS, e.g. 3x333, got {args.sites!r}") from None
    if s < 1 or g < 1:
        raise ConfigError(f"--sites must be positive, got {args.sites!r}")
    return s, g


def _networks(args, measured: LinkSpec | None) -> tuple[int, callable]:
    """The main worker count and a function N -> Network."""
    h = args.hierarchical
    if measured is not None:  # --probe: its slowest pair for every collective, as `plan` does
        return args.workers, lambda k: Network(workers=k, link=measured)
    if args.link_map is not None:
        if args.scale:
            raise ConfigError("--scale needs --sites or --workers, not --link-map (fixed ranks)")
        m = LinkMap.load(str(args.link_map))
        n = args.workers or (1 + max([*m.site_of, *(r for p in m.pairs for r in p)], default=0))
        return n, lambda k: Network(workers=k, link_map=m, hierarchical=h)
    if args.sites:
        s, g = _sites(args)
        if s > 1 and not args.inter:
            raise ConfigError("--sites with more than one site needs --inter (and --intra)")
        intra, inter = LinkSpec.parse(args.intra), LinkSpec.parse(args.inter)
        return s * g, lambda k: Network.sites(k, s, intra, inter, hierarchical=h)
    if args.workers is None or args.workers < 1:
        raise ConfigError("lowband simulate needs --workers N (at least 1), --sites or --link-map")
    if h:
        raise ConfigError("--hierarchical needs --sites")
    link = LinkSpec.parse(args.link)
    return args.workers, lambda k: Network(workers=k, link=link)


def _check(args) -> list[int]:
    for flag, value in (("--failure-rate", args.failure_rate), ("--recovery-s", args.recovery_s),
                        ("--detect-s", args.detect_s)):  # fmt: skip
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
    if args.max_steps < 1 or not (math.isfinite(args.max_days) and args.max_days > 0):
        raise ConfigError("--max-steps and --max-days must be positive")
    if not args.scale:
        return []
    try:
        scale = sorted({int(x) for x in args.scale.split(",")})
    except ValueError:
        raise ConfigError(
            f"--scale must be worker counts, e.g. 8,64,256, got {args.scale!r}"
        ) from None
    if scale[0] < 1 or scale[-1] > 100_000:
        raise ConfigError(f"--scale: worker counts must be in [1, 100000], got {args.scale!r}")
    return scale


def default_techniques(w, n: int, link: LinkSpec | None) -> list[Technique]:
    """DDP, and per family (DiLoCo, Streaming DiLoCo, SparseLoCo, NoLoCo, CO2, the federated
    rules, the gossip rules) the plan's fastest to budget: every technique `lowband plan` ranks."""
    preds = sorted((predict(w, t, n, link) for t in candidates()), key=lambda p: p.time_to_budget_s)
    out = [Technique("ddp")]
    for family in (
        lambda t: t.algo == "diloco" and not t.compress,
        lambda t: t.algo == "streaming-diloco" and not t.compress,
        lambda t: bool(t.compress),
        lambda t: t.algo == "noloco",
        lambda t: t.algo == "co2",
        lambda t: t.algo in FEDERATED,
        lambda t: t.algo in GOSSIP,
    ):
        out.append(next(p.technique for p in preds if family(p.technique)))
    return out


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("simulating {task.description}"), BarColumn(), MofNCompleteColumn(),
        console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty(),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    scale = _check(args)
    measured = _read_probe(args) if args.probe is not None else None
    n_main, make = _networks(args, measured)
    w = _workload(args)
    straggler = Straggler.parse(args.straggler)
    failures = Failures(args.failure_rate, args.recovery_s, args.detect_s)
    main_net = make(n_main)
    if args.technique:
        techniques = [parse_technique(s) for s in args.technique]
    else:
        everyone = list(range(n_main))
        techniques = default_techniques(w, n_main, main_net.group_link(everyone))
    sizes = sorted({n_main, *scale})
    cells = [(t, n) for n in sizes for t in techniques]
    results: dict[tuple[Technique, int], SimResult] = {}
    began = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task("", total=len(cells))
        for t, n in cells:
            bar.update(task, description=f"{t.label()}, {n} workers")
            net = main_net if n == n_main else make(n)
            results[(t, n)] = simulate(
                w, t, net, straggler, failures, seed=args.seed, max_steps=args.max_steps,
                max_wall_s=args.max_days * 86400,
            )  # fmt: skip
            bar.advance(task)
    elapsed = time.perf_counter() - began
    _print(args, w, main_net, techniques, sizes, n_main, results, straggler, failures, elapsed)
    model = args.model if args.params is None else f"{w.params / 1e9:g}B parameters"
    title = f"{model}, {main_net.describe()}\nstragglers {straggler}, "
    title += f"{failures.rate_per_hour:g} failures/worker/h"
    if args.plot:
        plot(args.plot, techniques, sizes, results, title)
    if args.html:
        args.html.write_text(html_page(title, techniques, sizes, results))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "network": main_net.describe(),
                    "workers": n_main,
                    "straggler": str(straggler),
                    "failures": dataclasses.asdict(failures),
                    "seed": args.seed,
                    "rows": [results[c].row() | {"workers": c[1]} for c in cells],
                    "measured": MEASURED,
                    "modelled": MODELLED,
                },
                indent=1,
                default=float,
            )
        )
    return 0


def _when(r: SimResult) -> str:
    if math.isinf(r.time_to_budget_s):
        return "never"
    return _duration(r.time_to_budget_s) + ("*" if r.extrapolated else "")


def _print(args, w, net, techniques, sizes, n_main, results, straggler, failures, elapsed):
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    console.print(
        f"lowband simulate: {w.params / 1e6:,.0f}M parameters, {net.describe()}, "
        f"{w.tokens:,.0f} tokens, {w.tokens_per_s:,.0f} tokens/s per worker "
        f"({1e3 * w.compute_s:.0f} ms per step of {w.step_tokens:,} tokens); stragglers "
        f"{straggler}; failures {failures.rate_per_hour:g}/worker/h, {failures.recovery_s:g} s "
        f"down, detected in {failures.detect_s:g} s; seed {args.seed}",
        highlight=False,
    )
    table = Table(title=f"{n_main} workers", title_justify="left")
    for col in ("technique", "step", "exposed/step", "util", "MB/step/worker", "to budget",
                "failures (rounds lost)", "heal stall"):  # fmt: skip
        table.add_column(col, justify="left" if col == "technique" else "right")
    for t in techniques:
        r = results[(t, n_main)]
        row = r.row()
        table.add_row(
            t.label(), f"{1e3 * r.step_s:,.0f} ms", f"{1e3 * row['exposed_per_step_s']:,.0f} ms",
            f"{100 * r.utilisation:.1f}%", f"{row['bytes_per_step'] / 1e6:,.2f}", _when(r),
            f"{r.failures} ({r.discarded_rounds})", f"{r.heal_s:,.0f} s",
        )  # fmt: skip
    console.print(table)
    if len(sizes) > 1:
        scaling = Table(title="utilisation (time to budget) by workers", title_justify="left")
        scaling.add_column("technique")
        for n in sizes:
            scaling.add_column(f"N={n}", justify="right")
        for t in techniques:
            cells = [results[(t, n)] for n in sizes]
            scaling.add_row(t.label(), *(f"{100 * r.utilisation:.1f}% ({_when(r)})" for r in cells))
        console.print(scaling)
    console.print(f"simulated in {elapsed:.1f} s", highlight=False)
    console.print("measured (inputs):", highlight=False)
    for line in MEASURED:
        console.print(f"  - {line}", highlight=False)
    console.print("modelled (assumptions):", highlight=False)
    for line in MODELLED:
        console.print(f"  - {line}", highlight=False)


def html_page(title: str, techniques, sizes, results) -> str:
    """One self-contained page (the report's style): a table per worker count, the plot, and
    what is measured and what is modelled."""
    import base64
    import io
    from datetime import datetime

    from lowband.report.html import _CSS, _esc

    png = io.BytesIO()
    plot(png, techniques, sizes, results, title)
    head = ("technique", "utilisation", "step", "exposed / step", "MB / step / worker",
            "time to budget", "failures", "rounds discarded")  # fmt: skip
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>lowband simulate</title><style>{_CSS}</style></head><body>",
        f"<h1>lowband simulate: {_esc(title)}</h1>",
        f'<p class="muted">Generated {datetime.now(UTC).isoformat(timespec="seconds")}.'
        " Times marked * are extrapolated at the simulated rate.</p>",
    ]
    for n in sizes:
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{_esc(c)}</td>"
                for c in (
                    t.label(),
                    f"{100 * r.utilisation:.1f}%",
                    f"{1e3 * r.step_s:.0f} ms",
                    f"{1e3 * (r.exposed_s / r.steps if r.steps else 0.0):.0f} ms",
                    f"{(r.bytes_per_worker / r.steps if r.steps else 0.0) / 1e6:.2f}",
                    _when(r),
                    r.failures,
                    r.discarded_rounds,
                )
            )
            + "</tr>"  # fmt: skip
            for t in techniques
            for r in [results[(t, n)]]
        )
        parts.append(f"<h2>{n} workers</h2><table><tr>")
        parts.append("".join(f"<th>{_esc(h)}</th>" for h in head) + f"</tr>{rows}</table>")
    data = base64.b64encode(png.getvalue()).decode("ascii")
    parts.append(
        f'<h2>Where each technique stops scaling</h2><figure><img src="data:image/png;base64,'
        f'{data}" alt="utilisation and time to budget against workers"></figure>'
    )
    for name, items in (("Measured", MEASURED), ("Modelled (assumptions)", MODELLED)):
        parts.append(f"<h2>{name}</h2><ul>" + "".join(f"<li>{_esc(x)}</li>" for x in items))
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def plot(path, techniques, sizes, results, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for t in techniques:
        rs = [results[(t, n)] for n in sizes]
        a.plot(sizes, [100 * r.utilisation for r in rs], marker="o", label=t.label())
        hours = [r.time_to_budget_s / 3600 for r in rs]
        b.plot(sizes, [x if math.isfinite(x) else float("nan") for x in hours], marker="o")
    a.set(xscale="log", xlabel="workers", ylabel="utilisation (%)", ylim=(0, 105))
    b.set(xscale="log", yscale="log", xlabel="workers", ylabel="time to budget (hours)")
    a.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(f"lowband simulate: {title}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
