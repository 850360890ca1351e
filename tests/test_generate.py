"""`lowband generate` on one process: the KV cache, sampling, --init, hf: models, the CLI's errors."""

from __future__ import annotations

import pytest
import torch

from lowband.cli import main
from lowband.models import build_model
from lowband.serve import GenerateConfig, Sampler, top_p_filter
from lowband.serve.engine import HFCached, decode_loop, generate_local, load_model

torch.set_num_threads(1)


def sharp_model(seed: int = 3):
    """A 1m model whose logits have clear margins (random init gives near-ties)."""
    model = build_model("1m", seed=seed).eval().requires_grad_(False)
    model.output.weight.mul_(30.0)
    return model


def greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_kv_cache_decode_gives_the_tokens_of_full_recompute():
    model = sharp_model()
    cfg = GenerateConfig(prompt="def main(", max_new_tokens=16)
    got = generate_local(model, cfg)["tokens"][0]
    assert got == greedy_by_recompute(model, list(b"def main("), 16)


def test_cached_logits_match_forward_for_chunks_at_an_offset():
    # chunks of 5 and 3 after a 7-token prefill use the explicit offset mask
    model = sharp_model()
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 20)
        parts = [model.forward_cached(x[:, a:b], cache) for a, b in ((0, 7), (7, 12), (12, 15))]
        parts += [model.forward_cached(x[:, i : i + 1], cache) for i in range(15, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds 20"):
        model.forward_cached(x[:, :1], cache)


def test_a_left_padded_batch_gives_each_prompt_its_own_logits():
    model = sharp_model()
    prompts = [list(b"def main(argv):"), list(b"x = 1"), list(b"import")]
    nxt = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    alone = []
    with torch.no_grad():
        for p, more in zip(prompts, nxt, strict=True):
            cache = model.new_cache(1, 20)
            steps = [model.forward_cached(torch.tensor([p]), cache)[:, -1]]
            steps += [model.forward_cached(torch.tensor([[t]]), cache)[:, -1] for t in more]
            alone.append(torch.cat(steps))
        L = max(map(len, prompts))
        cache = model.new_cache(3, 20)
        cache.pad_B = torch.tensor([L - len(p) for p in prompts])
        x = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
        batched = [model.forward_cached(x, cache)[:, -1]]
        batched += [
            model.forward_cached(torch.tensor(col)[:, None], cache)[:, -1] for col in zip(*nxt)
        ]
    got = torch.stack(batched, 1)  # B x steps x V
    for b in range(3):
        torch.testing.assert_close(got[b], alone[b], rtol=1e-5, atol=1e-5)


def test_sampling_is_deterministic_from_the_seed():
    model = build_model("1m", seed=0).eval()
    cfg = GenerateConfig(prompt="x = ", max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    a = generate_local(model, cfg)["tokens"][0]
    b = generate_local(model, cfg)["tokens"][0]
    c = generate_local(model, GenerateConfig(**{**cfg.to_dict(), "seed": 8}))["tokens"][0]
    assert a == b
    assert a != c
    assert a != generate_local(model, GenerateConfig(prompt="x = ", max_new_tokens=16))["tokens"][0]


def test_top_p_keeps_the_shortest_prefix_reaching_p():
    probs = torch.tensor([[0.125, 0.5, 0.25, 0.125], [0.25, 0.25, 0.25, 0.25]])

    def check(top_p: float, expect: list[list[float]]) -> None:
        torch.testing.assert_close(top_p_filter(probs, top_p), torch.tensor(expect))

    # row 0: 0.5 + 0.25 reaches 0.75 exactly; row 1: ties go to the lower ids
    check(0.75, [[0.0, 2 / 3, 1 / 3, 0.0], [1 / 3, 1 / 3, 1 / 3, 0.0]])
    check(0.5, [[0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    check(0.5 + 1e-6, [[0.0, 2 / 3, 1 / 3, 0.0], [1 / 3, 1 / 3, 1 / 3, 0.0]])
    check(1e-9, [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # the top token always stays
    assert top_p_filter(probs, 1.0) is probs


def test_sampler_greedy_and_nucleus_of_one():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0]])
    assert Sampler()(logits).tolist() == [1]  # argmax; ties: the lowest id
    nucleus = Sampler(temperature=5.0, top_p=1e-6, seed=1)
    assert {nucleus(torch.tensor([[0.0, 9.0, 1.0]])).item() for _ in range(20)} == {1}
    with pytest.raises(ValueError):
        Sampler(top_p=0.0)


def test_init_loads_a_checkpoints_weights(tmp_path):
    ckpt = tmp_path / "rank0.pt"
    torch.save({"model": sharp_model(seed=5).state_dict()}, ckpt)
    cfg = GenerateConfig(init=str(ckpt), prompt="import ", max_new_tokens=12)
    loaded = load_model(cfg, "cpu")
    assert generate_local(loaded, cfg)["tokens"] == generate_local(sharp_model(5), cfg)["tokens"]


def test_hf_model_with_its_cache_matches_recompute():
    model = load_model(GenerateConfig(model="hf:llama-tiny", seed=1), "cpu")
    model.hf.lm_head.weight.mul_(30.0)
    prompt = torch.tensor([list(b"for i in")])
    out = decode_loop(HFCached(model), prompt, 10, Sampler())
    seq = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(10):
            seq.append(
                int(model.hf(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            )
    assert out["tokens"][0] == seq[8:]
    assert out["ttft_s"] > 0 and out["tbt_mean_s"] > 0


def test_cli_generates_with_an_hf_model(capsys):
    argv = ["generate", "--model", "hf:llama-tiny", "--prompt", "hi", "--max-new-tokens", "4"]
    assert main([*argv, "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    model = load_model(GenerateConfig(model="hf:llama-tiny"), "cpu")
    kw = dict(prompt="hi", max_new_tokens=4, temperature=0.7, top_p=0.9, seed=3)
    expect = generate_local(model, GenerateConfig(model="hf:llama-tiny", **kw))["tokens"][0]
    assert out == bytes(expect).decode("utf-8", "replace") + "\n"
    assert "hf:llama-tiny none x1" in err


def test_cli_streams_text_and_prints_timings(capsys):
    assert main(["generate", "--prompt", "ab", "--max-new-tokens", "5", "--seed", "2"]) == 0
    out, err = capsys.readouterr()
    model = build_model("1m", seed=2).eval()
    expect = generate_local(model, GenerateConfig(prompt="ab", max_new_tokens=5, seed=2))["tokens"][
        0
    ]
    assert out == bytes(expect).decode("utf-8", "replace") + "\n"
    assert "TTFT" in err and "TBT" in err and "tokens/s" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "7b"], "unknown model '7b'"),
        (["--model", "hf:gpt5"], "unknown Hugging Face model"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--top-p", "0"], "--top-p must be positive"),
        (["--temperature", "-1"], "--temperature must be at least 0.0"),
        (["--parallel", "tp", "--workers", "3"], "does not divide the model's 4 attention heads"),
        (["--parallel", "tp", "--workers", "8", "--model", "1m"], "does not divide"),
        (["--parallel", "pp", "--workers", "5"], "5 stages for the model's 4 layers"),
        (["--parallel", "xx"], "unknown --parallel 'xx'"),
        (
            ["--parallel", "splitwise", "--workers", "3", "--prefill-workers", "3"],
            "at least 1 each",
        ),
        (["--parallel", "lamina", "--workers", "4"], "3 memory workers, which must divide"),
        (["--parallel", "pp", "--workers", "2", "--memory-budget", "9"], "--memory-budget streams"),
        (["--memory-budget", "0.5"], "the sliding window needs 2"),
        (["--allreduce", "bus"], "unknown --allreduce 'bus'"),
        (
            ["--model", "125m", "--parallel", "tp", "--workers", "12", "--allreduce", "tree"],
            "--allreduce tree needs a power-of-two --workers, got 12",
        ),
        (["--workers", "2"], "--workers 2 needs --parallel tp or pp"),
        (["--model", "hf:llama-tiny", "--parallel", "tp", "--workers", "2"], "runs in one process"),
        (["--prompt", ""], "--prompt must not be empty"),
        (["--max-new-tokens", "5000"], "exceeds the model's 4096 positions"),
        (["--link", "fast"], "malformed --link"),
        (["--init", "/no/such/run"], "no such run folder"),
        (["--max-new-tokens", "x"], "invalid int value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    try:
        code = main(["generate", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1


def test_gpu_generate_benchmark_smoke_on_cpu_matches_transformers_tokens(tmp_path, monkeypatch):
    # benchmarks/gpu_generate.py --device cpu --tiny: lowband and transformers decode the same
    # weights (fp32), so their greedy tokens agree; the JSON and markdown tables are written
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_generate.py"
    spec = importlib.util.spec_from_file_location("gpu_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = [
        "gpu_generate.py",
        "--device",
        "cpu",
        "--tiny",
        "--batch",
        "1,2",
        "--out",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    rows = json.loads((tmp_path / "gpu_generate.json").read_text())["rows"]
    assert [(r["impl"], r["batch"]) for r in rows] == [
        ("lowband eager", 1), ("transformers generate", 1),
        ("lowband eager", 2), ("transformers generate", 2),
    ]  # fmt: skip
    assert all(r["agree_tokens"] == r["new_tokens"] == 8 and r["tokens_per_s"] > 0 for r in rows)
    assert "| tiny | 2 | transformers generate |" in (tmp_path / "gpu_generate.md").read_text()
