"""The plan's two measured terms (issue #17): the real transport's own time per collective, which
lowband's link emulation adds before the link's time, and the wait for the slowest worker at each
sync, from measured per-worker step times (lowband.plan.cost, docs/plan.md)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lowband.cli import main
from lowband.comm import LinkSpec
from lowband.comm.accounting import all_gather_traffic, all_reduce_traffic, all_to_all_traffic
from lowband.models import build_model
from lowband.plan import Technique, Workload, predict
from lowband.plan.cost import straggler_wait, sync_costs

LINK = LinkSpec.parse("1gbit:5ms")
TRANSPORT = LinkSpec.parse("4gbit:0.2ms")


def _workload(**kw) -> Workload:
    model = build_model("1m", device="meta")
    return Workload(
        params=model.num_params(), layers=4, dim=128, batch_size=8, seq_len=128, tokens=10**6,
        tokens_per_s=8 * 128 / 0.1, model=model, **kw,
    )  # fmt: skip


def _ideal(link: LinkSpec, traffic) -> float:
    return link.ideal_time(traffic.critical_bytes, traffic.rounds)


def test_transport_comes_before_every_collectives_link_time():
    """A collective's real transfer completes, then the emulated link's time starts
    (lowband.comm.Comm): each collective costs link + transport; DiLoCo's quantized all-reduce is
    two of them; a point-to-point exchange is stamped at issue, so it costs the larger."""
    w, n = _workload(transport=TRANSPORT), 4
    bare = _workload()
    (bucket,) = w.ddp_buckets()  # 1m: one 25 MB bucket
    ar = all_reduce_traffic(bucket, 4, 0, n)
    ddp = predict(w, Technique("ddp"), n, LINK)
    assert ddp.exposed_s == pytest.approx(_ideal(LINK, ar) + _ideal(TRANSPORT, ar), rel=1e-12)
    assert ddp.exposed_s - predict(bare, Technique("ddp"), n, LINK).exposed_s == pytest.approx(
        _ideal(TRANSPORT, ar), rel=1e-9
    )
    # DiLoCo fp32: an all-to-all, then an all-gather, each transport then link.
    dil = Technique("diloco", sync_every=10, bits=32)
    ((seconds, _),) = sync_costs(w, dil, n, LINK)
    chunk = -(-w.params // n)  # fp32 codec: blocks of one value
    a2a, ag = all_to_all_traffic(n * 4 * chunk, 1, 0, n), all_gather_traffic(4 * chunk, 1, 0, n)
    assert seconds == pytest.approx(
        sum(_ideal(x, y) for x in (LINK, TRANSPORT) for y in (a2a, ag)), rel=1e-12
    )
    # NoLoCo (point to point): the larger of the two, so a slow transport shows, a fast one not.
    nol = Technique("noloco", sync_every=10, bits=16)
    link_only = sync_costs(bare, nol, n, LINK)[0][0]
    assert sync_costs(w, nol, n, LINK)[0][0] == link_only
    crawl = LinkSpec.parse("10mbit:1ms")
    slow = sync_costs(dataclasses.replace(w, transport=crawl), nol, n, LINK)[0][0]
    assert slow == pytest.approx(crawl.ideal_time(2 * w.params, 1)) and slow > link_only
    # No link at all: what remains is the transport.
    assert predict(w, Technique("ddp"), n, None).exposed_s == pytest.approx(_ideal(TRANSPORT, ar))


def test_quantized_transport_is_measured_apart_and_charges_the_quantized_reductions():
    """The quantized all-reduce (an all-to-all, then an all-gather; on a GPU over Gloo with their
    host staging) is slower per byte than the all-reduce the transport is fitted on (2-core box,
    4 workers, 38.6 MB: 169 ms against the all-reduce fit's 84 ms). Given its own measured link,
    DiLoCo's, Streaming DiLoCo's and 8-bit DDP's reductions take it, fp32 DDP and NoLoCo keep
    the all-reduce's; and the probe's fit recovers a link from its timings exactly."""
    from lowband.plan.cost import quantized_reduce_traffic
    from lowband.plan.probe import quantized_link

    slow = LinkSpec.parse("500mbit:2ms")
    w, n = _workload(transport=TRANSPORT, quantized_transport=slow), 4
    plain = _workload(transport=TRANSPORT)
    for t in (
        Technique("diloco", sync_every=10, bits=32),
        Technique("streaming-diloco", 10, 2, 2, bits=4),
        Technique("ddp", bits=8),
    ):
        numels = [w.params] if t.algo != "streaming-diloco" else w.fragment_numels(2)
        want = [
            sum(_ideal(x, y) for x in (LINK, slow) for y in quantized_reduce_traffic(k, n, t.bits))
            for k in numels
        ]
        got = [c[0] for c in sync_costs(w, t, n, LINK)]
        assert got == pytest.approx(want, rel=1e-12)
        assert all(a > b for a, b in zip(got, [c[0] for c in sync_costs(plain, t, n, LINK)]))
    for t in (Technique("ddp"), Technique("noloco", sync_every=10, bits=16)):
        assert sync_costs(w, t, n, LINK) == sync_costs(plain, t, n, LINK)
    # The probe's fit: timings made from a link give that link back.
    big = 10**7
    timed = [{
        "numel": [n, big],
        "seconds": [sum(_ideal(slow, y) for y in quantized_reduce_traffic(k, n, 32)) for k in (n, big)],
        "local_seconds": [0.001, 0.05 + r / 100],
    } for r in range(n)]  # fmt: skip
    fit = quantized_link(timed, n)
    assert fit["latency_s"] == pytest.approx(slow.latency_s, rel=1e-3)  # its bytes: ~0
    assert fit["bandwidth_bps"] == pytest.approx(slow.bandwidth_bps, rel=1e-3)
    assert fit["local_s"] == pytest.approx(0.05 + 0.015)


def test_transport_of_queued_buckets_shows_once_unless_it_is_the_slower():
    """DDP issues every bucket, then waits: the transport runs them one after another, and each
    bucket's link time starts after its transfer and the previous bucket's link time. A transport
    faster than the link shows once (the first bucket's); a slower one is the whole time but the
    last bucket's link."""
    w = Workload(params=10**8, layers=12, dim=768, batch_size=8, seq_len=1024, tokens=10**9,
                 tokens_per_s=1e5)  # fmt: skip
    buckets = w.ddp_buckets()
    n, link = 8, LinkSpec.parse("1gbit:1ms")
    assert len(buckets) > 3
    traffic = [all_reduce_traffic(b, 4, 0, n) for b in buckets]
    links = sum(_ideal(link, x) for x in traffic)
    fast = LinkSpec.parse("100gbit:10us")
    got = sync_costs(dataclasses.replace(w, transport=fast), Technique("ddp"), n, link)[0][0]
    assert got == pytest.approx(_ideal(fast, traffic[0]) + links, rel=1e-12)
    slow = LinkSpec.parse("100mbit:1ms")
    got = sync_costs(dataclasses.replace(w, transport=slow), Technique("ddp"), n, link)[0][0]
    assert got == pytest.approx(
        sum(_ideal(slow, x) for x in traffic) + _ideal(link, traffic[-1]), rel=1e-12
    )


def test_straggler_wait_separates_a_slow_worker_from_noise():
    """A worker 10% slower on every step: every sync waits for it, overlapped or not. Two workers
    that take turns being slow: a per-step sync waits for the slow one every step, a sync every two
    steps never waits (their sums are equal), nor does an overlapped one."""
    slow = [[1.0] * 8, [1.1] * 8]
    w, n = _workload(step_times=slow), 2
    tc = w.compute_s
    for t in (Technique("ddp"), Technique("diloco", sync_every=4, bits=32),
              Technique("streaming-diloco", sync_every=4, fragments=2, overlap=1, bits=4),
              Technique("co2", sync_every=4, bits=4)):  # fmt: skip
        p = predict(w, t, n, None)
        assert p.straggler_s == pytest.approx(tc * 0.05 / 1.05), t.label()
        assert p.step_s == pytest.approx(tc + p.straggler_s + p.exposed_s)
        assert p.utilisation == pytest.approx(tc / p.step_s)
    turns = [[1.0, 1.2] * 4, [1.2, 1.0] * 4]
    assert straggler_wait(turns, 2, 1) == pytest.approx(0.1 / 1.1)
    assert straggler_wait(turns, 2, 2) == pytest.approx(0.0, abs=1e-12)
    assert straggler_wait(turns, 2, 1, overlapped=True) == 0.0
    # Longer periods than measured: the one-step random part grows as sqrt(k).
    assert straggler_wait(turns, 2, 16) == pytest.approx(4 * 0.1 / 1.1)
    # NoLoCo waits inside its groups only: 4 workers in groups of 2 that each hold a twin.
    twins = [[1.0] * 8, [1.0] * 8, [1.5] * 8, [1.5] * 8]
    assert straggler_wait(twins, 4, 10) > 0
    assert straggler_wait(twins, 4, 10, group=2) == 0.0
    assert predict(_workload(step_times=twins), Technique("noloco", 10), 4, None).straggler_s == 0
    # A slowest worker made so by noise alone is not persistent (cross-validated halves).
    noise = [[1.0, 1.3, 1.0, 1.0], [1.0, 1.0, 1.0, 1.3]]
    assert straggler_wait(noise, 2, 4, overlapped=True) == 0.0
    assert predict(_workload(), Technique("ddp"), 2, None).straggler_s == 0.0
    with pytest.raises(ValueError, match="equally long"):
        _workload(step_times=[[1.0, 1.0], [1.0]])


def _steps(run, key):
    """Every rank's per-step increments of a metrics field, steps 3 to the one before the last."""
    rows = []
    for f in sorted((run / "metrics").glob("rank*.jsonl")):
        lines = map(json.loads, f.read_text().splitlines())
        at = {m["step"]: m for m in lines if "step" in m and "event" not in m}
        last = max(at)
        rows.append([at[s][key] - at[s - 1][key] for s in range(3, last)])
    return rows


def test_straggler_term_predicts_a_run_with_an_injected_slow_worker(tmp_path):
    """2 DDP workers over an emulated link, one of them (drawn per step) 0.15 s late every step:
    the wait for the slow one is in the step, not in anybody's mean compute. The plan fed every
    rank's measured step times predicts the measured step within 15%; fed only their mean, it
    misses by about a quarter."""
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--workers", "2", "--algo", "ddp", "--link", "1gbit:5ms",
            "--steps", "12", "--log-every", "1", "--eval-every", "12", "--eval-batches", "1",
            "--batch-size", "2", "--seq-len", "32", "--ckpt-every", "-1", "--slow-workers", "1",
            "--straggler-delay", "0.15"]  # fmt: skip
    assert main(argv) == 0
    compute, walls = _steps(out, "compute_time"), _steps(out, "wall_time")
    measured = sum(sum(r) for r in walls) / sum(len(r) for r in walls)
    mean = sum(sum(r) for r in compute) / sum(len(r) for r in compute)
    w = dataclasses.replace(_workload(), batch_size=2, seq_len=32, tokens_per_s=64 / mean)
    with_wait = predict(dataclasses.replace(w, step_times=compute), Technique("ddp"), 2, LINK)
    without = predict(w, Technique("ddp"), 2, LINK)
    assert with_wait.straggler_s == pytest.approx(0.075, rel=0.2)  # half the delay per worker
    assert abs(with_wait.step_s / measured - 1) < 0.15, (with_wait.step_s, measured)
    assert without.step_s / measured - 1 < -0.2, (without.step_s, measured)


def test_plan_cli_takes_a_transport(tmp_path, capsys):
    """`lowband plan --transport BANDWIDTH:LATENCY` adds it to every collective; a link spec
    with jitter, loss or noise is refused in one line."""
    common = ["plan", "--model", "1m", "--workers", "4", "--link", "1gbit:5ms", "--tokens-per-s",
              "10240", "--batch-size", "8", "--seq-len", "128", "--rank", "budget"]  # fmt: skip
    rows = {}
    for name, flags in (("bare", []), ("transport", ["--transport", "4gbit:0.2ms"])):
        js = tmp_path / f"{name}.json"
        assert main([*common, *flags, "--json", str(js)]) == 0
        rows[name] = {r["technique"]: r for r in json.loads(js.read_text())["rows"]}
    assert "transport per collective: 200 us per hop, 4.00 Gbit/s" in capsys.readouterr().out
    w = _workload(transport=TRANSPORT)
    ar = all_reduce_traffic(w.ddp_buckets()[0], 4, 0, 4)
    assert rows["transport"]["DDP"]["exposed_s"] - rows["bare"]["DDP"]["exposed_s"] == (
        pytest.approx(_ideal(TRANSPORT, ar))
    )
    for bad in ("4gbit:0.2ms:1ms", "fast"):
        assert main([*common, "--transport", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--transport {bad!r}" in err and "\n" not in err
