import pytest
import torch

from lowband.comm import Comm
from lowband.comm.codecs import Codec, get_codec
from lowband.comm.quantized import (
    quantized_all_reduce,
    quantized_all_reduce_bytes,
    reference_quantized_all_reduce,
)
from lowband.errors import ConfigError
from lowband.testing import run_ranks

CODECS = ["fp32", "bf16", "fp16", "int8", "int4"]
NUMELS = [1, 63, 64, 65, 1001]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(numel: int, seed: int) -> dict[str, torch.Tensor]:
    x = torch.randn(numel, generator=_gen(seed))
    outlier = x.clone()
    outlier[numel // 2] = 1e4  # one huge value in a block (still within fp16's range)
    return {"randn": x, "zeros": torch.zeros(numel), "outlier": outlier, "tiny": x * 1e-7}


# -- codecs alone --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("numel", NUMELS)
def test_round_trip_within_bound_and_exact_size(name, numel):
    codec = get_codec(name)
    assert isinstance(codec, Codec)
    for kind, x in _inputs(numel, seed=numel).items():
        payload = codec.encode(x)
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() * payload.element_size() == codec.payload_bytes(numel)
        y = codec.decode(payload, numel)
        assert y.dtype == torch.float32 and y.shape == x.shape
        err, bound = (y - x).abs(), codec.error_bound(x)
        assert bound.shape == x.shape
        assert (err <= bound).all(), f"{name} {kind}: max excess {(err - bound).max().item():.3g}"
        if kind == "zeros" or name == "fp32":
            assert torch.equal(y, x)


def test_payload_sizes():
    n, blocks = 1001, 16  # ceil(1001 / 64)
    assert get_codec(32).payload_bytes(n) == 4 * n
    assert get_codec(16).payload_bytes(n) == get_codec("fp16").payload_bytes(n) == 2 * n
    assert get_codec(8).payload_bytes(n) == n + 4 * blocks
    assert get_codec(4).payload_bytes(n) == 501 + 4 * blocks
    assert get_codec(4, block_size=128).payload_bytes(n) == 501 + 4 * 8


@pytest.mark.parametrize("name, limit", [("int8", 0.01), ("int4", 0.15)])
def test_blockwise_relative_error_on_gaussian(name, limit):
    codec, b = get_codec(name), 64
    x = torch.randn(64 * 256, generator=_gen(1))
    err = (codec.decode(codec.encode(x), x.numel()) - x).abs()
    absmax = x.abs().reshape(-1, b).amax(1).repeat_interleave(b)
    rel = (err / absmax).max().item()
    # Round-to-nearest on a grid of absmax/qmax: at most 1/(2*127) = 0.39% and 1/14 = 7.1%.
    assert rel < limit, f"{name}: max error {rel:.4%} of the block absmax"
    assert rel <= 0.5 / codec.qmax + 1e-6, f"{name}: max error {rel:.4%} of the block absmax"


def test_int4_packs_two_values_a_byte_and_odd_numel():
    codec = get_codec(4, block_size=4)
    x = torch.tensor([7.0, -7.0, 1.0, 0.0, 3.0])  # blocks [7, -7, 1, 0], [3]
    payload = codec.encode(x)
    assert payload.numel() == 2 * 4 + 3
    assert payload[8:].tolist() == [(8 - 7) << 4 | (8 + 7), 8 << 4 | (8 + 1), 8 << 4 | (8 + 7)]
    assert torch.equal(codec.decode(payload, 5), x)


def test_non_finite_poisons_only_its_block():
    codec = get_codec(8, block_size=4)
    x = torch.arange(12.0)
    x[5] = float("inf")
    y = codec.decode(codec.encode(x), 12)
    assert y[4:8].isnan().all() and y[:4].isfinite().all() and y[8:].isfinite().all()


def test_decode_rejects_wrong_payload_and_encode_wrong_input():
    codec = get_codec(8)
    with pytest.raises(ValueError, match="payload"):
        codec.decode(torch.zeros(10, dtype=torch.uint8), 64)
    with pytest.raises(ValueError, match="1-D float32"):
        codec.encode(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="1-D float32"):
        codec.encode(torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("bad", [3, 0, 64, "int2", "fp8", "", True, 16.0])
def test_get_codec_rejects(bad):
    with pytest.raises(ConfigError, match="unknown codec"):
        get_codec(bad)


def test_get_codec_rejects_block_size():
    with pytest.raises(ConfigError, match="block_size"):
        get_codec(8, block_size=0)


def test_get_codec_names():
    assert [get_codec(b).name for b in (32, 16, 8, 4)] == ["fp32", "bf16", "int8", "int4"]
    assert get_codec("FP16").name == "fp16" and get_codec(" int4 ").name == "int4"
    assert get_codec(8, block_size=32).block_size == 32


# -- quantized all-reduce ------------------------------------------------------------------------
def _rank_input(rank: int, numel: int) -> torch.Tensor:
    x = torch.randn(numel, generator=_gen(100 + rank))
    x[(37 * rank) % numel] *= 50.0  # an outlier, at a different place on every rank
    return x


def _two_stage_bound(xs: list[torch.Tensor], codec: Codec, op: str) -> torch.Tensor:
    """(1/n) sum_i e(x_i) + e(s) + fp32 summation slack, s the fp32 reduction of the decodes."""
    n = len(xs)
    scale = 1.0 / n if op == "avg" else 1.0
    decoded = [codec.decode(codec.encode(x), x.numel()) for x in xs]
    stage1 = sum(codec.error_bound(x) for x in xs) * scale
    # e(s) must see s with the blocks of the padded tensor, as the reduction does.
    chunk = -(-xs[0].numel() // (n * codec.block_size)) * codec.block_size
    s = torch.nn.functional.pad(sum(decoded) * scale, (0, n * chunk - xs[0].numel()))
    stage2 = codec.error_bound(s)[: xs[0].numel()]
    slack = n * 2.0**-23 * sum(d.abs() for d in decoded) * scale
    return stage1 + stage2 + slack


def _reduce_all(comm: Comm, numels: list[int], op: str):
    out = {}
    for name in CODECS:
        codec = get_codec(name)
        for numel in numels:
            x = _rank_input(comm.rank, numel)
            before = {k: v.bytes_sent for k, v in comm.stats.ops.items()}
            y = quantized_all_reduce(comm, x, codec, op=op)
            sent = {k: v.bytes_sent - before.get(k, 0) for k, v in comm.stats.ops.items()}
            out[name, numel] = (y, sent)
            assert torch.equal(x, _rank_input(comm.rank, numel)), "input modified"
    return out, set(comm.stats.ops)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_quantized_all_reduce(n):
    numels = [1, 63, 1001, 4 * 64 * 3 + 5]  # none but 1 divides by every world size
    op = "avg" if n != 3 else "sum"
    results = run_ranks(n, _reduce_all, numels, op)
    for _, ops in results:
        assert ops <= {"all_to_all", "all_gather"}, ops
    for name in CODECS:
        codec = get_codec(name)
        for numel in numels:
            xs = [_rank_input(r, numel) for r in range(n)]
            ys = [res[name, numel][0] for res, _ in results]
            for y in ys[1:]:
                assert torch.equal(y, ys[0]), f"{name} n={n} numel={numel}: ranks differ"
            y = ys[0]
            assert torch.equal(y, reference_quantized_all_reduce(xs, codec, op))
            exact = sum(xs) / n if op == "avg" else sum(xs)
            err = (y - exact).abs()
            if name == "fp32":
                torch.testing.assert_close(y, exact, rtol=1e-6, atol=1e-6)
            bound = _two_stage_bound(xs, codec, op)
            assert (err <= bound).all(), (
                f"{name} n={n} numel={numel}: max excess {(err - bound).max().item():.3g}"
            )
            expected_bytes = quantized_all_reduce_bytes(numel, n, codec)
            for res, _ in results:
                sent = res[name, numel][1]
                total = sent.get("all_to_all", 0) + sent.get("all_gather", 0)
                assert total == expected_bytes, (name, n, numel, sent, expected_bytes)
                if n > 1:
                    assert sent["all_to_all"] == sent["all_gather"] == expected_bytes // 2


def test_world_size_one_quantizes_like_many():
    x = _rank_input(0, 1001)
    for name in CODECS:
        codec = get_codec(name)
        y = quantized_all_reduce(Comm(None), x, codec)
        assert torch.equal(y, reference_quantized_all_reduce([x], codec))
    assert torch.equal(quantized_all_reduce(Comm(None), x, get_codec(32)), x)
    assert quantized_all_reduce_bytes(1001, 1, get_codec(8)) == 0


def test_bytes_formula():
    # 1001 elements, 4 ranks, int8, B = 64: chunk = ceil(1001/256)*64 = 256 elements,
    # payload 256 + 4*4 = 272 bytes, 2*3*272 sent.
    assert quantized_all_reduce_bytes(1001, 4, get_codec(8)) == 2 * 3 * 272
    # fp32 codec with n | numel: exactly a ring all-reduce's 2(n-1)/n of the tensor.
    assert quantized_all_reduce_bytes(1024, 4, get_codec(32)) == 2 * 3 * 1024 * 4 // 4
    # int4 moves about 4.5/32 of fp32's bytes.
    ratio = quantized_all_reduce_bytes(2**20, 4, get_codec(4)) / quantized_all_reduce_bytes(
        2**20, 4, get_codec(32)
    )
    assert ratio == pytest.approx(4.5 / 32)


def test_rejects_bad_op_and_input():
    with pytest.raises(ValueError, match="op"):
        quantized_all_reduce(Comm(None), torch.zeros(4), get_codec(8), op="max")
    with pytest.raises(ValueError, match="1-D float32"):
        quantized_all_reduce(Comm(None), torch.zeros(2, 2), get_codec(8))
