"""`lowband plan`'s cost model (lowband.plan): its bytes equal what `lowband train` counts, exactly,
for every technique it ranks; its seconds are the emulated link's; the CLI's table and refusals."""

from __future__ import annotations

import json

import pytest
from threaded_runs import workers_as_threads

from lowband.cli import main
from lowband.comm import LinkSpec
from lowband.models import build_model
from lowband.plan import Technique, Workload, predict

STEPS, N = 8, 2
RUN = ["--workers", str(N), "--steps", str(STEPS), "--eval-every", str(STEPS), "--batch-size", "2",
       "--seq-len", "32", "--ckpt-every", "-1"]  # fmt: skip
WORKERS = {"DFedSAM-MGS H=4, exponential, Q=2, 16-bit": 4}
"""Cases run on more than N workers: an exponential graph of degree 3."""


def _workload() -> Workload:
    model = build_model("1m", device="meta")
    return Workload(
        params=model.num_params(), layers=4, dim=128, batch_size=2, seq_len=32, tokens=10**6,
        tokens_per_s=1e4, model=model,
    )  # fmt: skip


@pytest.mark.parametrize(
    "technique",
    [
        Technique("ddp"),
        Technique("diloco", sync_every=4, bits=32),
        Technique("streaming-diloco", sync_every=4, fragments=2, overlap=1, bits=4),
        Technique("diloco", sync_every=4, compress="topk:0.05:2"),
        Technique("noloco", sync_every=4, bits=16),
        Technique("co2", sync_every=4, bits=4),
        Technique("scaffold", sync_every=1, participation=0.5),  # round 5 draws rank 1, not 0
        Technique("scafcom", sync_every=4),  # its default compressor, top-k: values + indices
        Technique("dfedsam-mgs", sync_every=4, topology="exponential", gossip_steps=2, bits=16),
    ],
    ids=lambda t: t.label(),
)
def test_predicted_bytes_are_what_a_run_counts(tmp_path, technique):
    """Every family's bytes, exact: the collectives, NoLoCo's groups, the federated star (SCAFFOLD
    with a partial draw of 1 of 2 clients, SCAFCOM's top-k wire) and gossip on a graph.
    (The run's workers are threads, threaded_runs: the same Comm counts the same bytes, without
    ~3 s of process start-up per run; the process launch is test_cli's.)"""
    from lowband.algorithms.federated import participants
    from lowband.plan.cost import FEDERATED, clients_per_round, star_exchange

    n = WORKERS.get(technique.label(), N)
    out = tmp_path / "run"
    run = [*RUN[2:], "--workers", str(n), *technique.flags(), "--out", str(out)]
    with workers_as_threads():
        assert main(["train", *run]) == 0
    measured = json.loads((out / "summary.json").read_text())["bytes_sent_per_worker"]
    w = _workload()
    start_check = 8 * (n - 1)  # every algorithm's 8-byte parameter digest, once
    if technique.participation == 1.0:
        assert measured == start_check + STEPS * predict(w, technique, n, None).bytes_per_step
        return
    assert technique.algo in FEDERATED  # the plan predicts the mean draw; check each real one
    m, total = clients_per_round(technique, n), n * start_check
    for r in range(1, STEPS // technique.sync_every + 1):
        senders = sum(1 for i in participants(list(range(n)), m, 0, r) if i != 0)
        total += star_exchange(w.params, n, technique, senders, None)[1]
    assert round(measured * n) == total


def test_predicted_seconds_follow_the_link_model():
    w = _workload()
    slow, fast = LinkSpec.parse("10mbit:100ms"), LinkSpec.parse("10gbit:1ms")
    ddp_slow, ddp_fast = (predict(w, Technique("ddp"), 4, link) for link in (slow, fast))
    assert ddp_slow.exposed_s > 50 * ddp_fast.exposed_s
    # DDP's ring: 2(n-1) hops of latency per bucket, plus the busiest uplink's bytes.
    assert ddp_slow.exposed_s == pytest.approx(
        len(w.ddp_buckets()) * 6 * 0.1 + ddp_slow.bytes_per_step * 8 / 10e6, rel=0.02
    )
    stream = predict(w, Technique("streaming-diloco", 100, 4, 10, bits=4), 4, slow)
    assert stream.exposed_s < ddp_slow.exposed_s / 50 and stream.utilisation > ddp_slow.utilisation
    hidden = predict(w, Technique("streaming-diloco", 100, 4, 24, bits=4), 4, slow)
    assert hidden.exposed_s <= stream.exposed_s  # more overlap never exposes more


def test_plan_cli_ranks_and_explains(tmp_path, capsys):
    js = tmp_path / "plan.json"
    argv = ["plan", "--model", "125m", "--tokens", "2e9", "--workers", "8", "--link", "1gbit:80ms",
            "--tokens-per-s", "400000", "--batch-size", "16", "--seq-len", "2048", "--json", str(js),
            "--rank", "budget"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "recommended" in text and "assumptions" in text.lower()
    plan = json.loads(js.read_text())
    times = [r["time_to_budget_s"] for r in plan["rows"]]
    assert plan["rows"][0]["technique"] == plan["recommended"]
    assert times[1:] == sorted(times[1:]) and times[0] <= 1.02 * min(times)  # ties: smallest H
    ddp = next(r for r in plan["rows"] if r["technique"] == "DDP")
    assert ddp["utilisation"] < 0.05  # 500 MB per step over 1 Gbit/s against a 82 ms step
    assert main(["plan", "--model", "125m", "--tokens", "1e9", "--workers", "8"]) == 2
    assert "--tokens-per-s" in capsys.readouterr().err


def test_probe_measures_what_the_emulated_link_sets_and_plan_reads_it(tmp_path, capsys):
    net = tmp_path / "net.json"
    argv = ["probe", "--workers", "2", "--link", "20mbit:100ms", "--megabytes", "2", "--pings", "5",
            "--batch-size", "2", "--seq-len", "32", "--out", str(net)]  # fmt: skip
    assert main(argv) == 0
    network = json.loads(net.read_text())
    (pair,) = network["pairs"]
    assert pair["latency_s"] == pytest.approx(0.100, rel=0.10)
    for rate in pair["bandwidth_bps"].values():
        assert rate == pytest.approx(20e6, rel=0.10)
    assert [c["rank"] for c in network["compute"]] == [0, 1]
    assert all(c["tokens_per_s"] > 0 for c in network["compute"])
    assert all(len(c["step_times_s"]) == 10 for c in network["compute"])
    # The transport, timed with the emulation off: far faster than the emulated link.
    transport = network["summary"]["transport"]
    assert transport["bandwidth_bps"] > 10 * 20e6 and 0 < transport["latency_s"] < 0.010
    quantized = transport["quantized"]  # the quantized all-reduce's, timed apart
    assert quantized["bandwidth_bps"] > 10 * 20e6 and 0 < quantized["latency_s"] < 0.010
    printed = capsys.readouterr().out
    assert "0-1" in printed and "Mbit" in printed and "tokens/s" in printed  # the matrix
    assert "transport (emulation off)" in printed
    js = tmp_path / "plan.json"
    assert (
        main(["plan", "--model", "1m", "--tokens", "1e7", "--probe", str(net), "--json", str(js)])
        == 0
    )
    plan = json.loads(js.read_text())
    link = LinkSpec.parse(plan["link"])  # the probe's slowest pair, largest latency
    assert plan["workers"] == 2 and link.bandwidth_bps == pytest.approx(20e6, rel=0.1)
    assert link.latency_s == pytest.approx(0.100, rel=0.1)
    # An emulated probe: its transport comes on top of every collective, its step times give
    # the wait for the slower worker, and the rate is the workers' mean.
    assert LinkSpec.parse(plan["transport"]).bandwidth_bps == pytest.approx(
        transport["bandwidth_bps"], rel=1e-3
    )
    assert LinkSpec.parse(plan["quantized_transport"]).bandwidth_bps == pytest.approx(
        quantized["bandwidth_bps"], rel=1e-3
    )
    assert [list(r) for r in plan["step_times"]] == [c["step_times_s"] for c in network["compute"]]
    ddp = next(r for r in plan["rows"] if r["technique"] == "DDP")
    assert ddp["straggler_s"] > 0
    assert ddp["step_s"] == pytest.approx(
        2 * 32 / network["summary"]["mean_tokens_per_s"] + ddp["straggler_s"] + ddp["exposed_s"]
    )


def test_plan_ranks_by_time_to_ddps_loss_with_the_measured_gaps(tmp_path):
    """--rank loss (the default): every row's time to DDP's loss is its time to the budget times
    (1 + measured gap)^(1/0.28); over a slow link the fewest bytes win the budget, but Streaming
    DiLoCo's smaller measured gap wins the loss."""
    from lowband.plan.cost import Technique
    from lowband.plan.penalty import MEASURED, gap, token_multiplier

    assert gap(Technique("diloco", 100, bits=4)) == MEASURED["diloco"]
    assert (
        gap(Technique("streaming-diloco", 100, 4, 10, compress="topk:0.01:2")) == MEASURED["sparse"]
    )
    assert not gap(Technique("ddp", bits=8)).measured
    diloco = 1.0977 / 0.8323  # chained: gossip against DiLoCo H=10, federated against FedAvg
    assert gap(Technique("dpsgd")).relative == pytest.approx(diloco * 2.4242 / 2.5717 - 1)
    assert gap(Technique("dpsgd")).measured and not gap(Technique("dfedsam")).measured
    assert gap(Technique("scallion")).relative == pytest.approx(diloco * 2.8860 / 2.7583 - 1)
    assert not gap(Technique("fedavg")).measured
    assert token_multiplier(MEASURED["ddp"]) == 1.0
    assert token_multiplier(MEASURED["streaming-diloco"]) == pytest.approx(
        (0.9500 / 0.8323) ** (1 / 0.28)
    )
    plans = {}
    for rank in ("budget", "loss"):
        js = tmp_path / f"{rank}.json"
        argv = ["plan", "--model", "125m", "--tokens", "1e9", "--workers", "8", "--link",
                "30mbit:100ms", "--tokens-per-s", "466000", "--rank", rank, "--json", str(js)]  # fmt: skip
        assert main(argv) == 0
        plans[rank] = json.loads(js.read_text())
    for r in plans["loss"]["rows"]:
        mult = (1 + max(0.0, r["loss_gap"])) ** (1 / 0.28)
        assert r["time_to_ddp_loss_s"] == pytest.approx(r["time_to_budget_s"] * mult)
    times = [r["time_to_ddp_loss_s"] for r in plans["loss"]["rows"]]
    assert times[0] <= 1.02 * min(times) and times[1:] == sorted(times[1:])
    assert "sparse" in plans["budget"]["recommended"]
    assert "4-bit" in plans["loss"]["recommended"]


def test_plan_takes_a_link_map_as_its_slowest_pair(tmp_path, capsys):
    """Two sites over a slow link plan like one slow link everywhere (a flat ring crosses it),
    and a map that leaves a worker out is refused in one line."""
    m = tmp_path / "sites.json"
    m.write_text(
        json.dumps({"sites": [[0, 1], [2, 3]], "intra": "100gbit:10us", "inter": "1gbit:80ms"})
    )
    common = ["plan", "--model", "125m", "--tokens", "1e9", "--workers", "4", "--tokens-per-s",
              "466000"]  # fmt: skip
    rows = {}
    for name, flags in (("map", ["--link-map", str(m)]), ("flat", ["--link", "1gbit:80ms"])):
        js = tmp_path / f"{name}.json"
        assert main([*common, *flags, "--json", str(js)]) == 0
        rows[name] = json.loads(js.read_text())["rows"]
    assert rows["map"] == rows["flat"]
    capsys.readouterr()
    assert main(["plan", "--model", "125m", "--workers", "5", "--link-map", str(m),
                 "--tokens-per-s", "466000"]) == 2  # fmt: skip
    assert "no link between workers 0 and 4" in capsys.readouterr().err


def test_memory_term_matches_the_measured_gpu_peaks():
    """The plan's memory term against the 9 training-step peaks measured on an H200
    (benchmarks/gpu_memory.py; tests/golden/gpu_memory_h200.json): each within 5%."""
    from pathlib import Path

    from lowband.models import PRESETS
    from lowband.plan.cost import memory_bytes

    golden = Path(__file__).parent / "golden" / "gpu_memory_h200.json"
    rows = json.loads(golden.read_text())["rows"]
    assert len(rows) == 9
    for r in rows:
        c = PRESETS[r["preset"]]
        w = Workload(r["params"], c.n_layers, c.dim, r["batch"], r["seq"], 0, 1.0, c.ffn_dim)
        predicted = memory_bytes(w, Technique("ddp"), compiled=r["compiled"])
        assert abs(predicted / r["peak_bytes"] - 1) < 0.05, r


# -- sequence parallelism (lowband.plan.seqpar_cost) --------------------------------------------


@pytest.mark.parametrize("scheme", ["ulysses", "ring"])
def test_seqpar_predicted_bytes_are_what_a_run_counts(tmp_path, scheme):
    """`lowband train --seq-parallel SCHEME --cp 2` on 2 CPU workers (fp32 activations): the
    counted bytes are the start check, per step the attention's and the loss mean's plus DDP's
    all-reduce, the shard check once, and the evaluation batch's forward, exactly."""
    from lowband.models import PRESETS
    from lowband.plan.seqpar_cost import Heads, predict_seqpar, signature_bytes

    out, steps = tmp_path / "run", 1
    flags = ["--workers", "2", "--seq-parallel", scheme, "--cp", "2", "--steps", str(steps),
             "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1", "--ckpt-every", "-1"]  # fmt: skip
    assert main(["train", "--out", str(out), *flags]) == 0  # processes: seqpar needs WORLD
    measured = json.loads((out / "summary.json").read_text())["bytes_sent_per_worker"]
    c = PRESETS["1m"]
    p = predict_seqpar(
        _workload(), Heads(c.n_heads, c.n_kv_heads, c.head_dim), scheme, 2, None, workers=2,
        itemsize=4,
    )  # fmt: skip
    ddp = predict(_workload(), Technique("ddp"), 2, None).bytes_per_step
    assert p.bytes_per_step > p.forward_bytes > 0
    assert measured == 8 + steps * (p.bytes_per_step + ddp) + signature_bytes(scheme, 2) + (
        p.forward_bytes
    )


def test_seqpar_memory_shrinks_the_activations_by_d_and_refuses_what_train_refuses():
    import dataclasses

    from lowband.plan.seqpar_cost import Heads, predict_seqpar

    n = 974_000_000
    w = Workload(n, 16, 2048, 1, 131072, 10**9, 5e4, 8192)
    h = Heads(32, 8, 64)
    fixed = 14 * n  # fp32 parameters, AdamW moments, bf16 weight copies: replicated
    one, four = (predict_seqpar(w, h, "ring", d, None, workers=8).memory_bytes for d in (1, 4))
    assert four - fixed == pytest.approx((one - fixed) / 4, abs=1)
    heads_12 = predict_seqpar(w, Heads(12, 4, 64), "ulysses", 8, None, workers=8)
    assert "Ulysses degree 8 must divide the heads" in heads_12.refusal
    odd = predict_seqpar(dataclasses.replace(w, seq_len=4104), h, "ring", 8, None, workers=8)
    assert "must be a multiple of 16" in odd.refusal


def test_plan_prints_the_seqpar_table_only_when_memory_does_not_fit(tmp_path, capsys):
    common = ["plan", "--model", "1b", "--workers", "8", "--link", "400gbit:5us", "--batch-size",
              "1", "--tokens-per-s", "50000", "--tokens", "1e9"]  # fmt: skip
    js = tmp_path / "p.json"
    assert main([*common, "--seq-len", "131072", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "sequence parallel" in text and "--seq-parallel ring --cp 4" in text
    sp = json.loads(js.read_text())["seq_parallel"]
    assert sp["advice"]["degree"] == 4 and sp["needed_bytes"] > sp["device_memory_bytes"]
    assert main([*common, "--seq-len", "8192", "--json", str(js)]) == 0
    assert "sequence parallel" not in capsys.readouterr().out
    assert json.loads(js.read_text())["seq_parallel"] is None
    for flags, message in (
        (["--seq-parallel", "ulysses:8", "--model", "125m"], "Ulysses degree 8 must divide"),
        (["--seq-parallel", "3"], "must be at least 1 and divide --workers 8"),
        (["--seq-parallel", "zigzag:2"], "--seq-parallel must be D or SCHEME:D"),
        (["--device-memory", "0"], "--device-memory must be a positive"),
    ):
        assert main([*common, "--seq-len", "8192", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
