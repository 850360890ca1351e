"""Tensor- and pipeline-parallel generation give single-process tokens; the star all-reduce."""

from __future__ import annotations

import time

import pytest
import torch

from lowband.comm import LinkSpec
from lowband.models import build_model
from lowband.serve import GenerateConfig, generate
from lowband.serve.allreduce import (
    predicted_seconds,
    ring_all_reduce,
    star_all_reduce,
    tree_all_reduce,
)
from lowband.serve.engine import generate_local
from lowband.serve.pp import stage_layers
from lowband.serve.worker import run_one
from lowband.testing import run_ranks

torch.set_num_threads(1)


def sharp_model(seed: int = 3):
    """A 1m model whose logits have clear margins (random init gives near-ties)."""
    model = build_model("1m", seed=seed).eval().requires_grad_(False)
    model.output.weight.mul_(30.0)
    return model


PROMPT = "class Foo:\n    def "


def single(model, **kw) -> list[int]:
    return generate_local(model, GenerateConfig(prompt=PROMPT, max_new_tokens=12, **kw))["tokens"][
        0
    ]


@pytest.mark.parametrize("allreduce", ["ring", "star", "tree"])
@pytest.mark.parametrize("workers", [2, 4])  # 4 > the 1m preset's 2 kv heads: kv heads shared
def test_tensor_parallel_gives_single_process_tokens(workers, allreduce):
    model = sharp_model()
    cfg = GenerateConfig(prompt=PROMPT, max_new_tokens=12, parallel="tp", allreduce=allreduce)
    results = run_ranks(workers, lambda comm: run_one(cfg, comm, model))
    assert results[0]["tokens"][0] == single(model)
    assert results[1:] == [None] * (workers - 1)


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_pipeline_parallel_gives_single_process_tokens_when_sampling_too(workers):
    model = sharp_model()
    model.output.weight.div_(10.0)  # softer: sampling has choices to make
    kw = dict(temperature=0.9, top_p=0.9, seed=11)
    cfg = GenerateConfig(prompt=PROMPT, max_new_tokens=12, parallel="pp", **kw)
    results = run_ranks(workers, lambda comm: run_one(cfg, comm, model))
    assert results[0]["tokens"][0] == single(model, **kw)  # bit-identical logits


@pytest.mark.parametrize("workers", [2, 3])  # 1 compute worker, 1 or 2 memory workers
def test_lamina_gives_single_process_tokens_and_bytes_independent_of_context(workers):
    model = sharp_model()
    cfg = GenerateConfig(prompt=PROMPT, max_new_tokens=12, parallel="lamina")
    results = run_ranks(workers, lambda comm: (run_one(cfg, comm, model), comm.stats.bytes_sent))
    assert results[0][0]["tokens"][0] == single(model)
    # per token and layer: q, k, v of 4 + 2 + 2 heads x 32 out, 4 heads x 32 back (fp32)
    fed = len(PROMPT) + 11  # the prompt, then 11 tokens one at a time
    assert results[0][1] == fed * 4 * (4 + 2 + 2) * 32 * 4
    assert [b for _, b in results[1:]] == [fed * 4 * 4 * 32 * 4 // (workers - 1)] * (workers - 1)


@pytest.mark.parametrize("sampling", [False, True])
def test_splitwise_ships_the_prompts_cache_and_gives_single_process_tokens(sampling):
    model = sharp_model()
    model.output.weight.div_(10.0)
    kw = dict(temperature=0.9, top_p=0.9, seed=5) if sampling else {}
    cfg = GenerateConfig(prompt=PROMPT, max_new_tokens=12, parallel="splitwise", **kw)
    results = run_ranks(2, lambda comm: (run_one(cfg, comm, model), comm.stats.bytes_sent))
    assert results[0][0]["tokens"][0] == single(model, **kw)
    kv = 4 * 2 * 2 * len(PROMPT) * 32 * 4  # layers x (k, v) x kv heads x prompt x head dim, fp32
    state = torch.Generator().get_state().numel() if sampling else 0
    assert [b for _, b in results] == [0, kv + 8 + state]  # the decode worker sends nothing


@pytest.mark.parametrize("mode", ["pp", "lamina", "splitwise"])
def test_bf16_modes_that_move_whole_tensors_give_single_process_bf16_tokens(mode):
    """--dtype bf16: pp, lamina and splitwise move bf16 activations, q/k/v and caches whole, so
    they give the bf16 single-process tokens exactly, at half the fp32 bytes (tp does not: each
    shard's partial sum is rounded to bf16 before the all-reduce; docs/inference.md)."""
    model = sharp_model().to(torch.bfloat16)
    cfg = GenerateConfig(prompt=PROMPT, max_new_tokens=12, parallel=mode, dtype="bf16")
    results = run_ranks(2, lambda comm: (run_one(cfg, comm, model), comm.stats.bytes_sent))
    assert results[0][0]["tokens"][0] == single(model)
    if mode == "lamina":  # q, k, v out and the attention back, 2 bytes a value
        fed = len(PROMPT) + 11
        assert results[0][1] == fed * 4 * (4 + 2 + 2) * 32 * 2


def test_stages_cover_the_layers_once():
    for n_layers, stages in [(4, 3), (6, 4), (12, 5), (4, 4)]:
        ranges = [stage_layers(n_layers, stages, s) for s in range(stages)]
        assert [i for r in ranges for i in r] == list(range(n_layers))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_tree_all_reduce_sums_identically_on_every_rank():
    def body(comm):
        t = torch.randn(3, 5, generator=torch.Generator().manual_seed(comm.rank))
        tree_all_reduce(comm, t)
        return t, comm.stats.bytes_sent

    results = run_ranks(4, body)
    expect = sum(torch.randn(3, 5, generator=torch.Generator().manual_seed(r)) for r in range(4))
    assert all(torch.equal(t, results[0][0]) for t, _ in results)
    torch.testing.assert_close(results[0][0], expect)
    assert {b for _, b in results} == {2 * 15 * 4}  # two rounds of the whole tensor


def test_star_all_reduce_sums_identically_on_every_rank_in_two_hops():
    def body(comm):
        t = torch.randn(3, 5, generator=torch.Generator().manual_seed(comm.rank))
        star_all_reduce(comm, t)
        return t, comm.stats.by_op()

    results = run_ranks(4, body)
    expect = sum(torch.randn(3, 5, generator=torch.Generator().manual_seed(r)) for r in range(4))
    for t, _ in results:
        assert torch.equal(t, results[0][0])  # bit-identical everywhere
    torch.testing.assert_close(results[0][0], expect)
    ops = results[0][1]
    assert set(ops) == {"all_to_all"} and ops["all_to_all"]["calls"] == 2
    assert ops["all_to_all"]["bytes_sent"] == 2 * 3 * 15 * 4  # (W - 1) chunks per phase


def test_star_and_tree_take_two_latency_hops_and_ring_six_on_four_workers():
    link = LinkSpec.parse("10gbit:40ms")

    def body(comm, fn):
        t = torch.ones(8)
        comm.barrier()
        t0 = time.perf_counter()
        fn(comm, t)
        return time.perf_counter() - t0, t

    star = run_ranks(4, body, star_all_reduce, link=link)
    ring = run_ranks(4, body, ring_all_reduce, link=link)
    tree = run_ranks(4, body, tree_all_reduce, link=link)
    assert all(torch.equal(t, torch.full((8,), 4.0)) for _, t in star + ring + tree)
    assert min(s for s, _ in star) >= 0.08 - 0.005
    assert min(s for s, _ in tree) >= 0.08 - 0.005  # log2(4) rounds of one hop
    assert min(s for s, _ in ring) >= 0.24 - 0.005
    assert max(s for s, _ in star + tree) < min(s for s, _ in ring)
    assert predicted_seconds("tree", 32, 4, link) == pytest.approx(2 * 0.04 + 2 * 32 * 8 / 1e10)
    assert predicted_seconds("star", 32, 4, link) == pytest.approx(2 * 0.04 + 2 * 3 * 32 * 8 / 1e10)
    assert predicted_seconds("ring", 32, 4, link) == pytest.approx(6 * 0.04 + 6 * 8 * 8 / 1e10)


def test_worker_processes_over_an_emulated_link_give_single_process_tokens(tmp_path):
    # the real path: lowband.launch.local processes, --init, one group running three modes
    ckpt = tmp_path / "rank0.pt"
    torch.save({"model": sharp_model().state_dict()}, ckpt)
    cfg = GenerateConfig(
        init=str(ckpt), prompt=PROMPT, max_new_tokens=12, workers=2, parallel="tp",
        link="1gbit:1ms", quiet=True,
    )  # fmt: skip
    modes = [
        {"allreduce": "ring"},
        {"allreduce": "star"},
        {"parallel": "pp"},
        {"parallel": "lamina"},
    ]
    results = generate(cfg, modes)
    expect = single(sharp_model())
    assert [r["tokens"][0] for r in results] == [expect] * 4
    ring, star, pp, lamina = results
    # bytes per worker: 2 all-reduces per layer of (prompt + 11) x 128 fp32 values
    values = 2 * 4 * (len(PROMPT) + 11) * 128
    assert ring["bytes_sent_by_worker"] == [values * 4] * 2
    assert star["bytes_sent_by_worker"] == [2 * values * 4] * 2
    assert pp["bytes_sent_by_worker"] == [(len(PROMPT) + 11) * 128 * 4, 12 * 8]
    assert lamina["bytes_sent_by_worker"] == [values * 4, values * 2]
    assert all(r["ttft_s"] > 0.001 and r["text"] for r in results)


def test_sliding_window_runs_a_model_4x_its_memory_budget(tmp_path):
    from lowband.models import ModelConfig
    from lowband.serve.window import tensor_bytes

    shape = ModelConfig(dim=128, n_layers=12, n_heads=4, n_kv_heads=2, ffn_dim=1024)

    def model():
        m = build_model(shape, seed=4).eval().requires_grad_(False)
        m.output.weight.mul_(30.0)
        return m

    total = tensor_bytes(model())
    budget_mb = total / 4 / 2**20
    expect = generate_local(model(), GenerateConfig(prompt=PROMPT, max_new_tokens=6))["tokens"][0]
    for workers, parallel in [(1, "none"), (2, "tp")]:
        cfg = GenerateConfig(
            prompt=PROMPT, max_new_tokens=6, parallel=parallel, memory_budget=budget_mb
        )
        folder = tmp_path / parallel
        out = run_ranks(
            workers, lambda comm, c, f: run_one(c, comm, model(), None, f), cfg, folder
        )[0]
        assert out["tokens"][0] == expect
        mem = out["memory"]
        assert mem["peak_bytes"] <= mem["budget_bytes"] == int(total / 4)
        assert mem["window"] >= 2 and mem["peak_layer_bytes"] >= 2 * mem["layer_bytes"]
        assert mem["layer_loads"] == 12 * 6  # every layer read back for every forward
        assert len(list((folder / "weights-rank0").glob("layer*.pt"))) == 12


def test_a_budget_below_two_layers_is_refused_in_one_line(tmp_path):
    from lowband.errors import ConfigError

    cfg = GenerateConfig(prompt=PROMPT, max_new_tokens=4, memory_budget=0.5)
    with pytest.raises(ConfigError, match=r"holds 0 layer\(s\) of 0\.75 MB .* needs 2"):
        run_one(cfg, run_ranks(1, lambda comm: comm)[0], sharp_model(), None, tmp_path)


def request_refs(model, n: int, **kw) -> list[list[int]]:
    """Each of n requests' tokens from one process (request i: its prompt, seed + i)."""
    from lowband.serve.requests import request_prompt

    seed = kw.pop("seed", 0)
    return [
        single_prompt(model, request_prompt(PROMPT, i, n), seed=seed + i, **kw) for i in range(n)
    ]


def single_prompt(model, prompt: str, **kw) -> list[int]:
    cfg = GenerateConfig(prompt=prompt, max_new_tokens=8, **kw)
    return generate_local(model, cfg)["tokens"][0]


@pytest.mark.parametrize("micro_batches", [0, 2])  # one request each; two padded batches
def test_pipeline_micro_batches_give_each_request_its_single_process_tokens(micro_batches):
    model = sharp_model()
    model.output.weight.div_(10.0)
    kw = dict(temperature=0.9, top_p=0.9, seed=7)
    n = 5
    cfg = GenerateConfig(
        prompt=PROMPT, max_new_tokens=8, parallel="pp", requests=n,
        micro_batches=micro_batches, **kw,
    )  # fmt: skip
    results = run_ranks(3, lambda comm: (run_one(cfg, comm, model), comm.stats.bytes_sent))
    out = results[0][0]
    assert out["tokens"] == request_refs(model, n, **kw)
    assert [len(r["gaps_s"]) for r in out["requests"]] == [7] * n
    # stage 0 and 1 send each micro-batch's h (B x L x E fp32) per step, the last the tokens
    from lowband.serve.requests import make_requests

    reqs = make_requests(cfg)
    m = micro_batches or n
    batches = [reqs[j::m] for j in range(m)]
    h = sum(len(b) * (max(len(r.prompt) for r in b) + 7) * 128 * 4 for b in batches)
    assert [b for _, b in results] == [h, h, n * 8 * 8]


@pytest.mark.parametrize("sampling", [False, True])
def test_splitwise_pools_route_a_stream_and_give_single_process_tokens(sampling):
    model = sharp_model()
    model.output.weight.div_(10.0)
    kw = dict(temperature=0.9, top_p=0.9, seed=5) if sampling else {}
    n = 6
    cfg = GenerateConfig(
        prompt=PROMPT, max_new_tokens=8, parallel="splitwise", requests=n, prefill_workers=2,
        arrival_rate=200.0, **kw,
    )  # fmt: skip
    results = run_ranks(4, lambda comm: (run_one(cfg, comm, model), comm.stats.bytes_sent))
    out = results[0][0]
    assert out["tokens"] == request_refs(model, n, **kw)
    recs = out["requests"]
    assert {r["decode_worker"] for r in recs} == {0, 1}
    assert {r["prefill_worker"] for r in recs} == {2, 3}
    arrivals = [r["arrival_s"] for r in recs]
    assert arrivals == sorted(arrivals) and arrivals[-1] > 0
    # a prefill worker sends, per request: 4 layers x (k, v) x 2 kv heads x L x 32 fp32, token
    state = torch.Generator().get_state().numel() if sampling else 0
    for p in (2, 3):
        expect = sum(
            4 * 2 * 2 * r["prompt_tokens"] * 32 * 4 + 8 + state
            for r in recs
            if r["prefill_worker"] == p
        )
        assert results[p][1] == expect
    assert results[0][1] == results[1][1] == 0  # decode workers send nothing


def test_colocated_workers_serve_their_own_requests_without_communication():
    model = sharp_model()
    cfg = GenerateConfig(prompt=PROMPT, max_new_tokens=8, parallel="colocated", requests=4)
    results = run_ranks(2, lambda comm: (run_one(cfg, comm, model), comm.stats.bytes_sent))
    out = results[0][0]
    assert out["tokens"] == request_refs(model, 4)
    assert {r["decode_worker"] for r in out["requests"]} == {0, 1}
    assert [b for _, b in results] == [0, 0]


def test_stream_options_that_cannot_apply_are_refused():
    from lowband.errors import ConfigError
    from lowband.serve import validate_generate

    bad = [
        (dict(parallel="tp", workers=2, requests=3), "--requests 3 runs with"),
        (dict(parallel="pp", workers=2, requests=2, micro_batches=3), "at most --requests"),
        (dict(parallel="pp", workers=2, requests=2, arrival_rate=5.0), "--arrival-rate needs"),
        (dict(parallel="splitwise", workers=2, prefill_workers=2), "at least 1 each"),
        (dict(parallel="tp", workers=2, link="1gbit:1ms", link_map="x.json"), "exclude each other"),
    ]
    for kw, message in bad:
        with pytest.raises(ConfigError, match=message):
            validate_generate(GenerateConfig(prompt=PROMPT, **kw))


def test_a_link_map_sets_each_pairs_link_for_generate(tmp_path):
    import json

    from lowband.errors import ConfigError
    from lowband.serve import validate_generate

    path = tmp_path / "links.json"
    path.write_text(json.dumps({"default": "10gbit:0ms", "pairs": [[0, 1, "1gbit:40ms"]]}))
    ckpt = tmp_path / "rank0.pt"
    torch.save({"model": sharp_model().state_dict()}, ckpt)
    cfg = GenerateConfig(
        init=str(ckpt), prompt=PROMPT, max_new_tokens=3, workers=2, parallel="pp",
        link_map=str(path), quiet=True,
    )  # fmt: skip
    (r,) = generate(cfg)
    assert r["tokens"][0] == single(sharp_model())[:3]
    assert r["tbt_p50_s"] >= 0.04  # the 40 ms pair, not the default
    with pytest.raises(ConfigError, match="worker 1 named, but --workers is 1"):
        validate_generate(GenerateConfig(prompt=PROMPT, link_map=str(path)))
