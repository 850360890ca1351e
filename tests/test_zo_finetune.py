"""`lowband finetune`: CLI errors, a run from --init, resume / newcomers by log replay, modes through
the whole loop, and a Hugging Face model. Workers run as threads (run_ranks) or, for the CLI,
in-process with --workers 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

from lowband.cli import main
from lowband.config import FinetuneConfig
from lowband.data import eval_batches, load_corpus, split_eval
from lowband.report.runs import load_run
from lowband.testing import run_ranks
from lowband.train.loop import evaluate
from lowband.train.rundir import RunDir
from lowband.zo.loop import finetune_worker, read_log
from lowband.zo.models import build_for_finetune

TINY = ["--seq-len", "32", "--batch-size", "2", "--eval-batches", "1"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 1m run of 2 first-order steps: the --init of the tests below."""
    out = tmp_path_factory.mktemp("pre") / "run"
    argv = ["train", "--workers", "1", "--steps", "2", "--out", str(out), *TINY]
    assert main(argv) == 0
    return out


def _finetune(tmp_path, *flags: str) -> int:
    return main(
        ["finetune", "--workers", "1", "--steps", "3", "--out", str(tmp_path / "ft"), *TINY, *flags]
    )


def test_bad_input_is_one_line_exit_2(tmp_path, pretrained, capsys):
    bad_state = tmp_path / "bad.pt"
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(3, 3)}}, bad_state)
    cases = [
        (["--init", str(tmp_path / "nowhere")], "no such run folder"),
        (["--init", str(pretrained), "--model", "10m"], "holds a '1m' model"),
        (["--init", str(bad_state), "--model", "1m"], "does not match the model"),
        (["--workers", "3", "--perturb-parallel"], "must be even"),
        (["--bits", "16"], "--bits must be 8"),
        (["--model", "hf:nope"], "unknown Hugging Face model"),
        (["--restore", "arith"], "--restore must be copy or host"),
    ]
    for i, (flags, message) in enumerate(cases):
        capsys.readouterr()
        assert main(["finetune", "--out", str(tmp_path / f"r{i}"), *TINY, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (flags, err)


def test_finetune_from_init_writes_a_reportable_run(tmp_path, pretrained):
    assert _finetune(tmp_path, "--init", str(pretrained), "--eval-every", "3") == 0
    run = RunDir(tmp_path / "ft")
    cfg = json.loads(run.config_path.read_text())
    assert cfg["algo"] == "zo" and cfg["model"] == "1m"  # the model came from --init
    # The starting weights are the pretrained checkpoint's, bit for bit.
    start = build_for_finetune("1m", 256, 1, "cpu", str(pretrained))
    saved = torch.load(RunDir(pretrained).checkpoints()[-1].path / "rank0.pt")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in start.state_dict().items())
    data = load_run(run.path)
    assert data.config["algo"] == "zo" and list(data.eval_steps) == [0, 3]
    assert [len(e["entries"]) for e in map(json.loads, open(run.path / "zo_log.jsonl"))] == [1] * 3
    assert json.loads(run.summary_path.read_text())["replicas_identical"] is True

    # --resume: flags that change the update rule are refused; more steps continue the run.
    assert main(["finetune", "--resume", str(run.path), "--lr", "1.0"]) == 2
    assert main(["finetune", "--resume", str(run.path), "--steps", "5", "--workers", "1"]) == 0
    assert read_log(run, FinetuneConfig(), 0).steps() == [1, 2, 3, 4, 5]


def _worker(comm, cfg, run, resume=False):
    return finetune_worker(cfg, comm, run, torch.device("cpu"), resume=resume)


def _cfg(tmp_path, **kw) -> tuple[FinetuneConfig, RunDir]:
    base = dict(steps=6, batch_size=2, seq_len=32, eval_batches=1, eval_every=3, log_every=1)
    cfg = FinetuneConfig(**{**base, **kw})
    run = RunDir(tmp_path / "run")
    if not run.path.exists():
        run.create(cfg)
    return cfg, run


def test_resume_and_newcomers_replay_the_log(tmp_path):
    """2 workers run 6 steps (checkpoints at 2, 4, 6). Checkpoints 4 and 6 are lost: 3 workers
    resume from checkpoint 2 + the log and reach step 6's parameters bit for bit with no model
    transfer, then train on to step 8, all three identical."""
    cfg, run = _cfg(tmp_path, workers=2, ckpt_every=2, keep_checkpoints=5)
    first = run_ranks(2, _worker, cfg, run)
    digest6 = first[0]["param_digest"]
    assert first[1]["param_digest"] == digest6
    # Bytes: one 1-byte code per worker per step; the ring all-gather charges (n-1) = 1 per step.
    lines = [json.loads(x) for x in open(run.metrics_path(0))]
    assert [r["bytes_sent"] for r in lines] == [r["step"] + 8 for r in lines]  # + the start check

    for step in (4, 6):
        shutil.rmtree(run.step_dir(step))
    assert [c.step for c in run.checkpoints()] == [2]
    assert read_log(run, cfg, 2).steps() == [3, 4, 5, 6]
    again = run_ranks(3, _worker, cfg, run, resume=True)
    assert [s["param_digest"] for s in again] == [digest6] * 3

    more = FinetuneConfig(**{**vars(cfg), "steps": 8, "workers": 3})
    final = run_ranks(3, _worker, more, run, resume=True)
    assert len({s["param_digest"] for s in final}) == 1 and final[0]["param_digest"] != digest6
    assert read_log(run, cfg, 0).steps() == list(range(1, 9))


@pytest.mark.parametrize("model", ["1m", "hf:llama-tiny"])
def test_perturbation_pair_equals_one_worker(tmp_path, model):
    """Through the whole loop: a +eps/-eps pair (one group) ends bit-identical to one worker
    computing both forwards (same slots, same batches); a 2-D run of 4 ranks equals 2 workers."""
    if model.startswith("hf:"):
        pytest.importorskip("transformers")
    digests = {}
    for name, workers, pp in [
        ("dp1", 1, False),
        ("pp2", 2, True),
        ("dp2", 2, False),
        ("2d4", 4, True),
    ]:
        cfg, run = _cfg(
            tmp_path / name, model=model, steps=3, workers=workers, perturb_parallel=pp, samples=2
        )
        out = run_ranks(workers, _worker, cfg, run)
        assert len({s["param_digest"] for s in out}) == 1
        digests[name] = out[0]["param_digest"]
    assert digests["pp2"] == digests["dp1"] and digests["2d4"] == digests["dp2"]
    assert digests["dp1"] != digests["dp2"]


def test_hf_model_learns(tmp_path):
    pytest.importorskip("transformers")
    from lowband.zo.models import HFCausalLM, build

    cfg, run = _cfg(
        tmp_path, model="hf:llama-tiny", steps=30, workers=2, lr=3e-3, eps=1e-2, eval_every=30
    )
    corpus = load_corpus(cfg.data)
    model = build("hf:llama-tiny", corpus.vocab_size, cfg.seed, "cpu")  # the run's start
    assert isinstance(model, HFCausalLM) and type(model.hf).__name__ == "LlamaForCausalLM"
    evals = eval_batches(split_eval(corpus)[1], batch_size=2, seq_len=32, num_batches=1)
    first = evaluate(model, evals, torch.device("cpu"), nullcontext)
    out = run_ranks(2, _worker, cfg, run)
    last = out[0]["final_eval_loss"]
    assert last < first - 0.05, (first, last)


@pytest.mark.slow
def test_cli_two_processes_perturbation_parallel(tmp_path, pretrained):
    """The real launch: 2 worker processes on Gloo, a +eps/-eps pair, from --init."""
    out = tmp_path / "pp"
    argv = ["finetune", "--init", str(pretrained), "--workers", "2", "--perturb-parallel"]
    assert main([*argv, "--steps", "3", "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["replicas_identical"] and summary["mode"] == "zo-pp"
    # Per step: one 1-byte code in the all-gather, a 4-byte loss each way within the pair.
    # + 8 bytes: the start check's digest.
    assert summary["bytes_by_op"] == {"all_gather": 11, "send": 12, "recv": 0}  # bytes sent


@pytest.mark.slow
def test_under_torchrun(tmp_path, pretrained):
    out = tmp_path / "tr"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lowband.cli",
         "finetune", "--init", str(pretrained), "--steps", "3", "--out", str(out), *TINY],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("run folder:") == 1  # only rank 0 speaks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_identical"]
    assert summary["bytes_by_op"] == {"all_gather": 11}
