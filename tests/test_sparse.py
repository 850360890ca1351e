"""SparseLoCo (lowband.comm.sparse, DiLoCo/Streaming DiLoCo --compress): the wire format, the
quantiser, error feedback's conservation of mass, the exact limit (all values at fp32 == DiLoCo
without momentum), byte counts, bit-identical replicas, checkpoints and heals, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lowband.algorithms import DiLoCo, StreamingDiLoCo
from lowband.cli import main
from lowband.comm import Comm
from lowband.comm.sparse import TiledTopK, TopK
from lowband.errors import ConfigError
from lowband.testing import run_ranks
from tests.test_diloco import flat, train


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
@pytest.mark.parametrize(
    ("numel", "chunk", "fraction"), [(1000, 64, 0.05), (300, 300, 1.0), (5, 4, 0.5)]
)
def test_payload_round_trips_and_has_the_announced_size(bits, numel, chunk, fraction):
    t = TopK(fraction, bits, chunk)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(bits))
    idx, codes, scale = t.select(x)
    payload = t.pack(idx, codes, scale)
    assert payload.dtype == torch.uint8 and payload.numel() == t.payload_bytes(numel)
    got_idx, got_vals = t.unpack(payload, numel)
    assert torch.equal(got_idx, idx) and torch.equal(got_vals, t.values(codes, scale))


def test_selection_keeps_the_largest_and_the_chunk_maximum_exactly():
    t = TopK(0.25, 2, chunk=8)
    x = torch.tensor(
        [0.1, -5.0, 0.2, 3.0, 0.0, 0.3, -0.4, 1.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    )
    idx, codes, scale = t.select(x)
    assert sorted(idx[0].tolist()) == [1, 3] and sorted(idx[1].tolist()) == [0, 7]  # within chunk
    dense = t.dense(idx, t.values(codes, scale), x.numel())
    assert dense[1] == -5.0 and dense[8] == 9.0  # each chunk's largest is exact
    assert torch.allclose(dense[3], torch.tensor(5.0 / 3))  # 2 bits: levels -s, -s/3, s/3, s
    assert torch.allclose(dense[15], torch.tensor(-3.0))
    assert (dense != 0).sum() == 4


# Per-tensor tiles (chunk 64: 8 x 8): a tiled matrix, a vector in runs, a matrix of 6 x 7 tiles,
# one whose sides have no divisor near 8 (5 x 11: in runs of its own), a scalar; 500 values.
SHAPES = [(16, 16), (20,), (12, 14), (5, 11), (1,)]


@pytest.mark.parametrize("layout", ["flat", "tiles"])
def test_error_feedback_conserves_mass(layout):
    """With decay 1, what was sent over the rounds plus what is left equals everything put in."""
    t = TopK(0.1, 2, chunk=32 if layout == "flat" else 64, layout=layout).bind(SHAPES)
    g = torch.Generator().manual_seed(0)
    error, sent, fed = torch.zeros(500), torch.zeros(500), torch.zeros(500)
    for _ in range(20):
        delta = torch.randn(500, generator=g)
        payload = t.compress_(error, delta, decay=1.0)
        assert payload.numel() == t.payload_bytes(500)
        idx, vals = t.unpack(payload, 500)
        sent += t.dense(idx, vals, 500)
        fed += delta
    torch.testing.assert_close(sent + error, fed, rtol=0, atol=1e-4)
    assert error.abs().max() > 0  # something is still waiting: the test can fail


@pytest.mark.parametrize("spec", ["topk:1:32", "topk:1:32:tiles"])
def test_all_values_at_fp32_equal_diloco_without_momentum(spec):
    """fraction 1, 32 bits, decay 0: every value is sent exactly and nothing is fed back, so
    SparseLoCo's outer step is DiLoCo's with plain SGD (outer momentum 0), bit for bit."""
    opts = dict(sync_every=3, outer_lr=0.7)
    sparse = run_ranks(
        2,
        lambda c: flat(
            train(c, lambda m, o, c: DiLoCo(m, o, c, compress=spec, error_decay=0.0, **opts), 9)[0]
        ),
    )
    dense = run_ranks(
        2,
        lambda c: flat(train(c, lambda m, o, c: DiLoCo(m, o, c, outer_momentum=0.0, **opts), 9)[0]),
    )
    for a, b in zip(sparse, dense, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("overlap", "layout"), [(0, "flat"), (1, "flat"), (1, "tiles")])
def test_replicas_identical_and_bytes_are_the_payloads(overlap, layout):
    n, steps = 3, 8

    def body(comm):
        algo_box = {}

        def make(m, o, c):
            algo_box["a"] = StreamingDiLoCo(
                m, o, c, sync_every=4, fragments=2, overlap=overlap,
                compress=f"topk:0.05:2:{layout}",
            )  # fmt: skip
            return algo_box["a"]

        model, algo, _ = train(comm, make, steps)
        shapes = [[tuple(g.shape) for g in frag] for frag in algo.global_params]
        globals_ = torch.cat([g.reshape(-1) for frag in algo.global_params for g in frag])
        return (
            globals_,
            comm.stats.by_op(),
            shapes,
            algo.outer_steps,
            float(algo.error[0].abs().sum()),
        )

    results = run_ranks(n, body)
    t = TopK(0.05, 2, layout=layout)
    for globals_, ops, shapes, outer, residual in results:
        assert torch.equal(globals_, results[0][0])  # bit-identical replicas
        assert outer == 4 and residual > 0
        # 2 syncs of each fragment; the start check's 8-byte digest is the only other all-gather.
        sizes = [sum(torch.Size(s).numel() for s in frag) for frag in shapes]
        sent = [t.bind(frag).exchange_bytes(s, n) for frag, s in zip(shapes, sizes)]
        assert ops["all_gather"]["bytes_sent"] == 2 * sum(sent) + 8 * (n - 1)
        if layout == "tiles":  # by hand: each tensor of this small model is one chunk, its own,
            by_hand = 0  # and keeps k = round(0.05 x 4096) = 205 of its values (all if fewer)
            for numel in [torch.Size(s).numel() for frag in shapes for s in frag]:
                assert numel <= 64 * 64
                bits = min(numel, 205) * (math.ceil(math.log2(numel)) + 2)
                by_hand += -(-bits // 8) + 4  # packed indices and values, one fp32 scale
            assert sum(sent) == (n - 1) * by_hand


def test_checkpoint_keeps_the_error_feedback_and_a_heal_starts_it_empty():
    def make(m, o, c):
        return DiLoCo(m, o, c, sync_every=2, compress="topk:0.1")

    _, algo, _ = train(Comm(None), make, 4)
    state = algo.state_dict()
    assert state["error"][0].abs().sum() > 0
    _, other, _ = train(Comm(None), make, 1)
    other.load_state_dict(state)
    assert torch.equal(other.error[0], algo.error[0])
    other._healing = True  # what join() sets around the heal
    other.load_state_dict(state)
    assert other.error[0].abs().sum() == 0


def test_bad_compress_settings_are_refused():
    with pytest.raises(ConfigError, match="compress"):
        DiLoCo(*_model_opt(), Comm(None), compress="top:0.1")
    with pytest.raises(ConfigError, match="fraction must be in"):
        DiLoCo(*_model_opt(), Comm(None), compress="topk:0")
    with pytest.raises(ConfigError, match="error_decay"):
        DiLoCo(*_model_opt(), Comm(None), compress="topk:0.1", error_decay=1.5)


def _model_opt():
    from tests.test_diloco import CFG, build_model

    model = build_model(CFG)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_cli_streaming_sparse_run_learns_and_counts(tmp_path):
    out = tmp_path / "sparse"
    argv = ["train", "--workers", "2", "--steps", "16", "--eval-every", "16", "--batch-size", "4",
            "--seq-len", "64", "--algo", "streaming-diloco", "--sync-every", "8", "--fragments", "2",
            "--overlap", "1", "--compress", "topk:0.02:2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["compress"] == "topk:0.02:2"
    # 4 fragment syncs of ~425k values: 104 chunks x (82 x 14 bits + a 4-byte scale) each, to the
    # one other worker: ~61 KB, where 4-bit Streaming DiLoCo would send ~0.9 MB.
    assert 50_000 < summary["bytes_sent_per_worker"] < 70_000
    assert summary["final_eval_loss"] < 5.0


def test_a_large_group_averages_the_decoded_payloads_densely():
    """The dense exchange (an fp32 all-reduce of each worker's decoded payload) gives the
    gather's mean up to summation order, bit-identical on every worker, and the byte counter
    charges the all-reduce; `exchange` picks it only where it costs less (about 450 workers at
    1% / 2 bits)."""
    from lowband.comm import quantized_all_reduce_bytes
    from lowband.comm.codecs import get_codec

    topk, numel = TopK.parse("topk:0.05:2", chunk=256), 1000

    def body(comm, exchange):
        g = torch.Generator().manual_seed(comm.rank)
        payload = topk.compress_(torch.zeros(numel), torch.randn(numel, generator=g), 0.0)
        before = comm.stats.bytes_sent
        mean = topk.average(payload, numel, comm, exchange=exchange)
        return mean, comm.stats.bytes_sent - before

    dense = run_ranks(3, body, "dense")
    gather = run_ranks(3, body, "gather")
    for (d, sent_d), (g, sent_g) in zip(dense, gather):
        torch.testing.assert_close(d, g, rtol=1e-6, atol=1e-7)
        assert torch.equal(d, dense[0][0])
        assert sent_d == quantized_all_reduce_bytes(numel, 3, get_codec(32))
        assert sent_g == topk.exchange_bytes(numel, 3) == 2 * topk.payload_bytes(numel)
    big = TopK.parse("topk:0.01:2")
    assert big.exchange(10**7, 4) == "gather" and big.exchange(10**7, 1000) == "dense"
    assert big.exchange_bytes(10**7, 1000) == quantized_all_reduce_bytes(10**7, 1000, get_codec(32))


def test_the_library_classes_take_a_sparse_compressor_object():
    """lowband.SparseCompressor (TopK) passed as `compress` runs exactly like its spec string."""
    import lowband

    comp = lowband.SparseCompressor(0.05, bits=2)

    def body(comm, compress):
        model, algo, _ = train(
            comm, lambda m, o, c: DiLoCo(m, o, c, sync_every=3, compress=compress), 6
        )
        return flat(model)

    a = run_ranks(2, body, comp)
    b = run_ranks(2, body, "topk:0.05:2")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_tiles_are_per_tensor_and_two_dimensional():
    """Layout "tiles" (the reference code's rule): k per 2 x 2 tile of the matrix (chunk 4, k 1),
    runs of the vector's own values; no chunk crosses the two tensors. The flat layout's
    compressor is the spec itself, so its figures cannot change."""
    spec = TopK.parse("topk:0.25:32:tiles", chunk=4)
    assert spec.layout == "tiles" and TopK.parse("topk:0.25:32").bind([(4, 4)]) == TopK(0.25, 32)
    t = spec.bind([(4, 4), (6,)])
    # 4 tiles x 1 x (2 + 32) bits = 17 bytes, then 2 runs x 1 x (2 + 32) bits = 9 (fp32: no scale)
    assert isinstance(t, TiledTopK) and t.payload_bytes(22) == 17 + 9
    x = torch.randn(22, generator=torch.Generator().manual_seed(3))
    error = torch.zeros(22)
    sent = t.dense(*t.unpack(t.compress_(error, x, 0.0), 22), 22)
    torch.testing.assert_close(sent + error, x, rtol=0, atol=0)

    def by_tile(v):  # [tile, its 4 values] of the 4 x 4 matrix
        return v[:16].view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)

    assert ((by_tile(sent) != 0).sum(1) == 1).all()  # one value per 2 x 2 tile, its largest
    assert torch.equal(by_tile(sent).abs().amax(1), by_tile(x).abs().amax(1))
    assert (sent[16:20] != 0).sum() == 1 and (sent[20:] != 0).sum() == 1  # runs of 4, then 2
    with pytest.raises(ConfigError, match="layout"):
        TopK.parse("topk:0.1:2:rows")
    with pytest.raises(ConfigError, match="bind"):
        spec.compress_(torch.zeros(22), x, 0.0)


@pytest.mark.parametrize("layout", ["flat", "tiles"])
def test_the_senders_mean_divides_each_coordinate_by_who_sent_it(layout):
    """--sparse-mean senders: each coordinate's sum of decoded values over the number of workers
    whose top-k held it, written out here from each worker's own decoded payload; bit-identical
    on every worker, the gather's bytes, and always the gather (even for a group where the dense
    exchange would be cheaper)."""
    numel, shapes = 48 * 40, [(48, 40)]
    topk = TopK(0.05, 2, chunk=64, layout=layout, mean="senders").bind(shapes)

    def body(comm):
        g = torch.Generator().manual_seed(comm.rank)
        payload = topk.compress_(torch.zeros(numel), torch.randn(numel, generator=g), 0.0)
        own = topk.dense(*topk.unpack(payload, numel), numel)
        idx, vals = topk.unpack(payload, numel)
        ones = (
            [torch.ones_like(v) for v in vals] if isinstance(vals, list) else torch.ones_like(vals)
        )
        sent = topk.dense(idx, ones, numel)
        before = comm.stats.bytes_sent
        mean = topk.average(payload, numel, comm)
        return mean, own, sent, comm.stats.bytes_sent - before

    results = run_ranks(3, body)
    total = sum(r[1] for r in results)
    count = sum(r[2] for r in results)
    assert count.max() > 1 and (count == 1).any() and (count == 0).any()  # the case it is about
    expected = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    for mean, _, _, sent in results:
        assert torch.equal(mean, results[0][0])
        torch.testing.assert_close(mean, expected, rtol=1e-6, atol=0.0)
        assert sent == 2 * topk.payload_bytes(numel)
    # a coordinate one worker sent lands whole, where the plain mean lands a third of it
    one = (count == 1).nonzero()[0]
    assert torch.equal(results[0][0][one], total[one])
    assert topk.exchange(10**7, 10_000) == "gather"


def test_the_senders_mean_is_refused_where_it_cannot_mean_what_it_says(tmp_path):
    with pytest.raises(ConfigError, match="sparse_mean"):
        DiLoCo(*_model_opt(), Comm(None), sparse_mean="senders")  # without --compress
    with pytest.raises(ConfigError, match="sparse_mean"):
        DiLoCo(*_model_opt(), Comm(None), compress="topk:0.1", sparse_mean="some")
    with pytest.raises(ConfigError, match="mean must be"):
        TopK(0.1, mean="median")
    base = ["train", "--workers", "3", "--steps", "4", "--algo", "diloco", "--compress",
            "topk:0.1", "--sparse-mean", "senders", "--out", str(tmp_path / "x")]  # fmt: skip
    assert main([*base, "--aggregate", "trimmed-mean", "--byzantine-tolerance", "1"]) == 2
    assert main([*base, "--elastic"]) == 2
