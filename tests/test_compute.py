"""The compute side of a step (lowband.train.compute): compiled blocks against eager, activation
checkpointing against keeping activations (outputs and gradients), batches fetched ahead, and a
loop that reads the loss only on the steps it writes."""

from __future__ import annotations

import copy

import pytest
import torch

from lowband.algorithms import check
from lowband.comm import Comm
from lowband.config import TrainConfig
from lowband.errors import ConfigError
from lowband.models import ModelConfig, Transformer
from lowband.train.compute import DeviceBatches, adamw, prepare_model, wants_compile
from lowband.train.loop import MetricsWriter, Timers, run_loop
from lowband.train.session import LocalSession

TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (4, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _train(model, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    opt = adamw(model, lr=1e-2, weight_decay=0.1, device=torch.device("cpu"))
    losses, grads = [], []
    for step in range(steps):
        loss = model.loss(*_batch(step))
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    ref = Transformer(TINY, seed=1)
    ckpt = copy.deepcopy(ref)
    prepare_model(ckpt, compile=False, activation_checkpointing=True)
    assert ckpt.checkpoint_activations
    (l_ref, g_ref), (l_ck, g_ck) = _train(ref, 3), _train(ckpt, 3)
    assert l_ref == l_ck  # fp32 on the CPU: the recomputed forward is the same arithmetic
    for a, b in zip(g_ref, g_ck, strict=True):
        assert torch.equal(a, b)


def test_compiled_blocks_agree_with_eager_and_keep_parameter_names():
    ref = Transformer(TINY, seed=2)
    compiled = copy.deepcopy(ref)
    prepare_model(compiled, compile=True, activation_checkpointing=False)
    assert list(compiled.state_dict()) == list(ref.state_dict())
    (l_ref, g_ref), (l_c, g_c) = _train(ref, 4), _train(compiled, 4)
    torch.testing.assert_close(torch.tensor(l_c), torch.tensor(l_ref), rtol=1e-4, atol=1e-5)
    for a, b in zip(g_c, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    for a, b in zip(compiled.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_default_and_its_refusal_with_sequence_parallelism():
    assert wants_compile(None, torch.device("cpu")) is False
    assert wants_compile(None, torch.device("cuda")) is True
    assert wants_compile(None, torch.device("cuda"), seq_parallel=True) is False
    assert wants_compile(True, torch.device("cpu")) is True
    assert wants_compile(False, torch.device("cuda")) is False
    with pytest.raises(ConfigError, match="--compile does not combine with --seq-parallel"):
        check(TrainConfig(compile=True, seq_parallel="ring", cp=2, workers=2))
    check(TrainConfig(compile=False, seq_parallel="ring", cp=2, workers=2))


class _Sampler:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def batch(self, step: int):
        self.asked.append(step)
        return torch.full((2,), step), torch.full((2,), -step)


def test_batches_are_fetched_one_step_ahead_and_a_jump_misses():
    sampler = _Sampler()
    batches = DeviceBatches(sampler, torch.device("meta"))  # any non-CPU device fetches ahead
    for step in (1, 2, 3):
        x, _ = batches.batch(step)
        assert x.device.type == "meta"
    assert sampler.asked == [1, 2, 3, 4]  # each step's batch was fetched the step before
    batches.batch(7)  # a heal or resume jumps: fetched fresh, then 8 ahead
    assert sampler.asked == [1, 2, 3, 4, 7, 8]
    cpu = DeviceBatches(_Sampler(), torch.device("cpu"))
    x, y = cpu.batch(5)
    assert x.tolist() == [5, 5] and cpu.sampler.asked == [5]  # nothing ahead on the CPU


class _Loss:
    """A loss whose reading is counted: float() is where a real one waits for the device."""

    reads = 0

    def __float__(self) -> float:
        _Loss.reads += 1
        return 1.0


class _Job:
    steps, tokens_per_step, label, start_step = 12, 1, "job", 0

    def __init__(self) -> None:
        self.step = 0

    def take_step(self):
        self.step += 1
        return _Loss()

    def evaluate(self) -> float:
        return 2.0

    def metrics(self) -> dict:
        return {}

    def save(self, step: int) -> None: ...
    def close(self) -> None: ...


def test_the_loop_reads_the_loss_only_on_the_steps_it_writes(tmp_path):
    cfg = TrainConfig(log_every=5, eval_every=6, ckpt_every=-1, workers=1)
    session = LocalSession(cfg, Comm(None))
    metrics = MetricsWriter(tmp_path / "m.jsonl")
    _Loss.reads = 0
    eval_loss, loss = run_loop(_Job(), cfg, session, metrics, Timers(), lambda: 0.0)
    metrics.close()
    assert (eval_loss, loss) == (2.0, 1.0)
    assert _Loss.reads == 4  # steps 5, 6 (eval), 10, 12 (eval, last) of 12


def test_workers_share_gpus_round_robin_over_gloo(monkeypatch):
    from lowband.launch import local
    from lowband.train.meta import gpu_sharing

    assert local.gpu_of(0, 2, 2) == (0, "nccl") and local.gpu_of(1, 2, 2) == (1, "nccl")
    assert [local.gpu_of(r, 4, 1) for r in range(4)] == [(0, "gloo")] * 4
    assert [local.gpu_of(r, 4, 2)[0] for r in range(4)] == [0, 1, 0, 1]
    monkeypatch.setattr(local, "gpu_count", lambda: 1)
    assert local.pick_device(TrainConfig(device="cuda", workers=4), 4) == "cuda"
    assert local.pick_device(TrainConfig(device="auto", workers=4), 4) == "cpu"  # auto: one each
    monkeypatch.setattr(local, "gpu_count", lambda: 0)
    with pytest.raises(ConfigError, match="needs a GPU, and this machine has none"):
        local.pick_device(TrainConfig(device="cuda", workers=4), 4)
    assert gpu_sharing(4, torch.device("cpu"), "gloo") is None
    assert gpu_sharing(2, torch.device("cuda", 0), "nccl") is None
    shared = gpu_sharing(4, torch.device("cuda", 0), "gloo")  # Gloo on a GPU: workers share
    assert shared is not None and shared["workers"] == 4 and "reflect the sharing" in shared["note"]


def _muon_run(model, steps: int, opt=None, start: int = 0):
    from lowband.train.compute import inner_optimizer

    opt = opt or inner_optimizer(
        model, "muon", lr=1e-2, weight_decay=0.1, device=torch.device("cpu")
    )
    losses = []
    for step in range(start, start + steps):
        loss = model.loss(*_batch(step % 2))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return opt, losses


def test_muon_for_the_block_matrices_adamw_for_the_rest_learns_and_resumes():
    from lowband.train.compute import Composite, inner_optimizer

    model = Transformer(TINY, seed=3)
    opt, losses = _muon_run(model, 12)
    assert isinstance(opt, Composite)
    muon, other = opt.optimizers
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert id(model.tok_embeddings.weight) not in in_muon and id(model.output.weight) not in in_muon
    assert len(in_muon) + sum(len(g["params"]) for g in other.param_groups) == len(
        list(model.parameters())
    )
    assert losses[-1] < losses[0] - 0.5  # it learns (two batches, memorised)
    # Resume: 3 steps, a state dict, 3 more == 6 uninterrupted.
    a, b = Transformer(TINY, seed=4), Transformer(TINY, seed=4)
    opt_a, _ = _muon_run(a, 6)
    opt_b, _ = _muon_run(b, 3)
    saved_model, saved_opt = copy.deepcopy(b.state_dict()), copy.deepcopy(opt_b.state_dict())
    c = Transformer(TINY, seed=99)
    c.load_state_dict(saved_model)
    opt_c = inner_optimizer(c, "muon", lr=1e-2, weight_decay=0.1, device=torch.device("cpu"))
    opt_c.load_state_dict(saved_opt)
    _muon_run(c, 3, opt_c, start=3)
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_schedule_and_an_algorithm_s_step_hooks_drive_the_composite():
    from lowband.algorithms import DDP
    from lowband.train.compute import inner_optimizer

    model = Transformer(TINY, seed=5)
    opt = inner_optimizer(model, "muon", lr=1e-2, weight_decay=0.0, device=torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert {g["lr"] for g in opt.param_groups} == {5e-3}
    calls = []
    with DDP(model, opt, Comm(None)) as algo:
        algo.sync_gradients = lambda: calls.append("sync")  # the pre-step hook calls it
        model.loss(*_batch()).backward()
        opt.step()
        sched.step()
    assert calls == ["sync"] and algo.local_step == 1


def test_cli_inner_optimizer(tmp_path, capsys):
    from lowband.cli import main

    out = tmp_path / "muon"
    assert main(["train", "--workers", "1", "--steps", "4", "--eval-every", "4", "--batch-size",
                 "2", "--seq-len", "32", "--inner-optimizer", "muon", "--out", str(out)]) == 0  # fmt: skip
    assert (out / "summary.json").exists()
    assert main(["train", "--inner-optimizer", "sgd", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown --inner-optimizer 'sgd'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
