"""--aggregate, --attack and --stragglers in training: robust DDP and DiLoCo against single-process
references, coded DDP against the uncoded average, straggler rounds, CLI runs and config errors."""

import dataclasses
import itertools
import json
import time

import numpy as np
import pytest
import torch

from lowband.algorithms import DDP, CodedDDP, DiLoCo, StreamingDiLoCo, build_algorithm
from lowband.algorithms.robust import attacker_ranks
from lowband.cli import main
from lowband.coding import StragglerInjector, cyclic_mds, fractional_repetition
from lowband.comm import Comm, get_codec
from lowband.comm.accounting import CommStats
from lowband.config import TrainConfig
from lowband.data import ShardSampler
from lowband.models import ModelConfig, build_model
from lowband.robust import RobustReducer, apply_attack, get_aggregator, get_attack
from lowband.testing import run_ranks

CFG = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=32)
B, L = 8, 16


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batch(rank: int, step: int):
    """A learnable synthetic task: the next token is the current one plus one (mod V)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, CFG.vocab_size, (B, L), generator=g)
    return x, (x + 1) % CFG.vocab_size


def grads_of(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


# -- robust DDP ------------------------------------------------------------------------------------
def robust_ddp_worker(comm: Comm, aggregate, f, attack, attackers, steps, lr=3e-2, sgd=False):
    model = build_model(CFG, seed=1)
    if sgd:  # the step follows the aggregate's norm, which Adam would normalise away
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    reducer = RobustReducer(
        comm, aggregate, f, attack=attack, attackers=attacker_ranks(comm.size, attackers)
    )
    algo = DDP(model, opt, comm, reducer=reducer)
    record = []
    for step in range(steps):
        model.loss(*batch(comm.rank, step)).backward()
        local = grads_of(model).clone()
        algo.sync_gradients()
        record.append((local, grads_of(model).clone()))
        opt.step()
        opt.zero_grad()
        algo.step()
    x, y = batch(999, 0)
    with torch.no_grad():
        loss = float(model.loss(x, y))
    return record, torch.cat([p.detach().reshape(-1) for p in model.parameters()]), loss


@pytest.mark.parametrize(
    "aggregate, f, attack", [("trimmed_mean", 1, "ipm"), ("krum", 1, "gaussian"), ("cc", 1, "alie")]
)
def test_robust_ddp_gradient_is_the_rule_over_gathered_gradients(aggregate, f, attack):
    n = 5
    out = run_ranks(n, robust_ddp_worker, aggregate, f, attack, 1, 3)
    rule = get_aggregator(aggregate, f=f, n=n)  # stateful for cc: fed the same rounds in order
    for step in range(3):
        local = torch.stack([out[r][0][step][0] for r in range(n)])
        gen = torch.Generator().manual_seed((0 * 1_000_003 + step) * 1_009 + 0)
        attacked = apply_attack(local, [n - 1], get_attack(attack), gen)
        expect = rule(attacked)
        for r in range(n):
            assert torch.equal(out[r][0][step][1], out[0][0][step][1])  # bit-identical on all ranks
            torch.testing.assert_close(out[r][0][step][1], expect, rtol=1e-5, atol=1e-6)
    for r in range(n):
        assert torch.equal(out[r][1], out[0][1])  # replicas stay identical


def test_robust_ddp_keeps_the_clean_loss_under_attack_where_the_mean_does_not():
    # Gaussian noise from 2 of 6 workers: AdamW normalises away attacks that only rescale the
    # mean (sign flip, IPM below n/3), not noise of a foreign scale.
    n, steps = 6, 10
    clean = run_ranks(n, robust_ddp_worker, "mean", 0, None, 0, steps)[0][2]
    start = run_ranks(n, robust_ddp_worker, "mean", 0, None, 0, 0)[0][2]
    plain = run_ranks(n, robust_ddp_worker, "mean", 0, "gaussian", 2, steps)[0][2]
    for name in ("median", "trimmed_mean"):
        robust = run_ranks(n, robust_ddp_worker, name, 2, "gaussian", 2, steps)[0][2]
        assert robust <= 1.10 * clean, (name, robust, clean)
    assert clean < 0.2 * start  # the task is learned at all
    assert plain > 3 * clean, (plain, clean)


def test_robust_ddp_bytes_are_the_all_gather_at_bits():
    def body(comm, bits):
        model = build_model(CFG, seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        codec = get_codec(bits)
        algo = DDP(model, opt, comm, reducer=RobustReducer(comm, "median", 0, codec))
        before = comm.stats.bytes_sent
        model.loss(*batch(comm.rank, 0)).backward()
        algo.sync_gradients()
        numel = sum(p.numel() for p in model.parameters())
        return comm.stats.bytes_sent - before, (comm.size - 1) * codec.payload_bytes(numel)

    for bits in (32, 8):
        for sent, expect in run_ranks(3, body, bits):
            assert sent == expect


# -- robust DiLoCo ---------------------------------------------------------------------------------
class Recording(RobustReducer):
    """A RobustReducer that keeps every call's input and output."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __call__(self, x, round_, key=0, **kwargs):
        out = super().__call__(x, round_, key, **kwargs)
        self.calls.append((round_, key, x.clone(), out.clone()))
        return out


def diloco_worker(comm: Comm, streaming: bool, aggregate, attack, compress=None):
    model = build_model(CFG, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reducer = None
    if aggregate is not None:
        reducer = Recording(comm, aggregate, 1, attack=attack, attackers=[comm.size - 1])
    if streaming:
        algo = StreamingDiLoCo(
            model, opt, comm, sync_every=4, fragments=2, overlap=1, bits=32, reducer=reducer
        )
    else:
        algo = DiLoCo(model, opt, comm, sync_every=3, reducer=reducer, compress=compress)
    for step in range(8):
        model.loss(*batch(comm.rank, step)).backward()
        opt.step()
        opt.zero_grad()
        algo.step()
    algo.close()
    theta_g = torch.cat([g.reshape(-1) for frag in algo.global_params for g in frag])
    return theta_g, (reducer.calls if reducer else []), algo.peak_sync_bytes


@pytest.mark.parametrize("streaming", [False, True])
def test_diloco_pseudo_gradients_are_aggregated_robustly(streaming):
    n = 4
    out = run_ranks(n, diloco_worker, streaming, "cc", "sign-flip")
    calls = [o[1] for o in out]
    assert len(calls[0]) == (4 if streaming else 2)
    rules = {}
    for c in range(len(calls[0])):
        round_, key = calls[0][c][:2]
        x = torch.stack([calls[r][c][2] for r in range(n)])
        gen = torch.Generator().manual_seed((0 * 1_000_003 + round_) * 1_009 + key)
        x = apply_attack(x, [n - 1], get_attack("sign_flip"), gen)
        rule = rules.setdefault(key, get_aggregator("cc"))  # one stateful rule per fragment
        expect = rule(x)
        for r in range(n):
            assert calls[r][c][:2] == (round_, key)
            torch.testing.assert_close(calls[r][c][3], expect, rtol=1e-6, atol=1e-7)
    for r in range(n):
        assert torch.equal(out[r][0], out[0][0])  # the global parameters agree bit for bit
    numel = max(x[2].numel() for x in calls[0])
    assert out[0][2] == (n - 1) * 4 * numel  # fp32 all-gather of the largest fragment


def test_sparse_diloco_updates_are_aggregated_robustly_over_decoded_rows():
    """--compress with --aggregate: every worker's top-k payload is gathered, decoded to a dense
    row, attacked rows replaced, and the rule run over those rows; bytes are the payloads."""
    from lowband.comm.sparse import TopK

    n, spec = 4, "topk:0.05:2"
    out = run_ranks(n, diloco_worker, False, "cc", "sign-flip", spec)
    calls = [o[1] for o in out]
    assert len(calls[0]) == 2
    codec = TopK.parse(spec).as_codec()
    rule = get_aggregator("cc")
    numel = sum(p.numel() for p in build_model(CFG, seed=1).parameters())
    for c in range(2):
        round_, key = calls[0][c][:2]
        payloads = [calls[r][c][2] for r in range(n)]
        assert payloads[0].dtype == torch.uint8  # the payload travels, not the dense update
        x = torch.stack([codec.decode(p, numel) for p in payloads])
        top = TopK.parse(spec)  # each row holds at most k values per chunk
        assert ((x != 0).sum(1) <= top.chunks(numel) * top.k).all() and (x != 0).any()
        assert (x != 0).sum() < 0.5 * x.numel()
        gen = torch.Generator().manual_seed((0 * 1_000_003 + round_) * 1_009 + key)
        expect = rule(apply_attack(x, [n - 1], get_attack("sign_flip"), gen))
        for r in range(n):
            torch.testing.assert_close(calls[r][c][3], expect, rtol=1e-6, atol=1e-7)
    for r in range(n):
        assert torch.equal(out[r][0], out[0][0])
    assert out[0][2] == (n - 1) * TopK.parse(spec).payload_bytes(numel)


def test_diloco_with_the_mean_reducer_matches_the_default_path():
    default = run_ranks(3, diloco_worker, False, None, None)
    gathered = run_ranks(3, diloco_worker, False, "mean", None)
    torch.testing.assert_close(gathered[0][0], default[0][0], rtol=1e-5, atol=1e-6)


# -- gradient coding ---------------------------------------------------------------------------------
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, 20_000).astype(np.uint16)


def sampler(rank, n):
    return ShardSampler(TOKENS, rank=rank, world_size=n, batch_size=B, seq_len=L, seed=3)


def part_grad(model, j, n, step):
    model.zero_grad()
    model.loss(*sampler(j, n).batch(step)).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


class _StandIn:
    """A Comm of rank i of n with nobody to talk to: only rank i's part bookkeeping is used, and
    the start check (an all-gather of parameter digests) finds every rank identical, as it is."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size, self.device = rank, size, torch.device("cpu")
        self.stats = CommStats()

    def all_gather(self, outputs, tensor) -> None:
        for out in outputs:
            out.copy_(tensor)


@pytest.mark.parametrize("make", [fractional_repetition, cyclic_mds])
def test_coded_gradient_is_the_uncoded_average_for_every_survivor_set(make):
    n, s, step = 6, 2, 5
    code = make(n, s)
    model = build_model(CFG, seed=2).double()
    g = {j: part_grad(model, j, n, step) for j in range(n)}
    reference = torch.stack(list(g.values())).mean(0)
    # What each rank's CodedDDP sends: its own part from the loop, the others it computes.
    algos = []
    for i in range(n):
        rank_i = _StandIn(i, n)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        algo = CodedDDP(model, opt, rank_i, code=code)
        tapped = algo.wrap_sampler(sampler(i, n))
        model.zero_grad()
        model.loss(*tapped.batch(step)).backward()
        parts = algo.part_gradients()
        assert sorted(parts) == sorted(code.parts(i))
        for j in parts:
            torch.testing.assert_close(parts[j], g[j], rtol=0, atol=0)
        algos.append(code.encode(i, parts))
    for stragglers in itertools.combinations(range(n), s):
        survivors = {i: algos[i] for i in range(n) if i not in stragglers}
        torch.testing.assert_close(code.decode(survivors) / n, reference, rtol=0, atol=1e-12)


def coded_worker(comm: Comm, s, delay, steps, coded=True):
    n = comm.size
    model = build_model(CFG, seed=2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    injector = StragglerInjector(n, p=1.0, delay_s=delay, max_stragglers=s, seed=11)
    if coded:
        code = fractional_repetition(n, s) if n % (s + 1) == 0 else cyclic_mds(n, s)
        algo = CodedDDP(model, opt, comm, code=code, injector=injector)
    else:
        algo = DDP(model, opt, comm, injector=injector)
    data = algo.wrap_sampler(sampler(comm.rank, n))
    rec = []
    for step in range(1, steps + 1):
        before = [p.detach().clone() for p in model.parameters()]
        model.loss(*data.batch(step)).backward()
        t0 = time.perf_counter()
        algo.sync_gradients()
        seconds = time.perf_counter() - t0
        rec.append(
            (before, grads_of(model).clone(), seconds, list(getattr(algo, "last_survivors", [])))
        )
        opt.step()
        opt.zero_grad()
        algo.step()
    algo.close()
    return rec


@pytest.mark.parametrize("n, s", [(4, 1), (5, 2)])
def test_coded_ddp_step_equals_uncoded_average_without_waiting_for_stragglers(n, s):
    delay, steps = 1.0, 3  # long, so 'did not wait' is clear on a busy machine; slow ranks abandon
    out = run_ranks(n, coded_worker, s, delay, steps)
    injector = StragglerInjector(n, p=1.0, delay_s=delay, max_stragglers=s, seed=11)
    ref_model = build_model(CFG, seed=2).double()
    for step in range(1, steps + 1):
        before, _, seconds, survivors = out[0][step - 1]
        with torch.no_grad():
            for p, b in zip(ref_model.parameters(), before):
                p.copy_(b)
        reference = torch.stack([part_grad(ref_model, j, n, step) for j in range(n)]).mean(0)
        for r in range(n):
            torch.testing.assert_close(out[r][step - 1][1], reference, rtol=0, atol=1e-10)
        slow = injector.stragglers(step - 1)
        assert len(slow) == s
        assert not slow & set(survivors), (slow, survivors)  # decoded without the slow ranks
        if 0 not in slow:
            assert seconds < delay / 2, seconds  # rank 0 did not wait for them


def test_uncoded_ddp_with_slow_workers_waits_for_them():
    out = run_ranks(4, coded_worker, 1, 0.3, 2, coded=False)
    assert min(out[0][k][2] for k in range(2)) > 0.25  # rank 0 waits in the all-reduce


# -- config and CLI --------------------------------------------------------------------------------
def test_label_flip_attackers_are_the_last_ranks():
    cfg = TrainConfig(workers=3, attack="label-flip", attackers=1)

    def body(comm):
        model = build_model(CFG, seed=0)
        algo = build_algorithm(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), comm)
        x, y = algo.wrap_sampler(sampler(comm.rank, 3)).batch(1)
        return y, sampler(comm.rank, 3).batch(1)[1]

    out = run_ranks(3, body)
    assert torch.equal(out[0][0], out[0][1]) and torch.equal(out[1][0], out[1][1])
    assert torch.equal(out[2][0], CFG.vocab_size - 1 - out[2][1])


FAST = ["--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--ckpt-every", "-1"]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """A 200 kB text corpus: each worker reads it in milliseconds, where the stdlib takes ~1 s."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    rng = np.random.default_rng(0)
    words = ["robust", "gradient", "worker", "byzantine", "coding", "straggler", "mean", "step"]
    path.write_text(" ".join(rng.choice(words, 30_000)))
    return str(path)


def test_cli_robust_run_end_to_end(tmp_path, small_text):
    # 6 worker processes on 2 cores, FLAG's eigen-solve at every step: ~0.45 s a step, so a few
    # steps (past the attack's first use, through an evaluation) say all this test asks.
    out, steps = tmp_path / "r", 8
    argv = ["train", "--aggregate", "flag", "--byzantine-tolerance", "2", "--attack", "alie"]
    argv += ["--attackers", "2", "--workers", "6", "--steps", str(steps), "--out", str(out), *FAST]
    argv += ["--data", small_text, "--attackers-at", "random"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == steps and np.isfinite(s["final_eval_loss"])
    # what the loss was measured under is said in the summary and in the report's run table
    assert s["robust"] == "flag f=2 vs alie x2 (random)"
    from lowband.report import write_report

    page = write_report([out], tmp_path / "report").read_text()
    assert "flag f=2 vs alie x2 (random)" in page
    numel = build_model("1m", vocab_size=256).num_params()
    # every step's fp32 gradients all-gathered from 5 peers, plus the 8-byte start-up digests
    assert s["bytes_by_op"]["all_gather"] == steps * 5 * 4 * numel + 5 * 8


def test_cli_coded_run_end_to_end(tmp_path, small_text):
    out = tmp_path / "c"
    argv = ["train", "--stragglers", "1", "--workers", "3", "--straggler-delay", "0.05"]
    argv += ["--steps", "4", "--out", str(out), "--data", small_text, *FAST]  # cyclic code
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 4 and np.isfinite(s["final_eval_loss"])
    assert set(s["bytes_by_op"]) >= {"send", "recv"}


BAD = [
    (["--aggregate", "bulyan", "--byzantine-tolerance", "2", "--workers", "10"], "n >= 4f + 3"),
    (["--aggregate", "nope"], "unknown aggregator"),
    (["--aggregate", "median", "--byzantine-tolerance", "2", "--workers", "4"], "2f < --workers"),
    (["--byzantine-tolerance", "1"], "needs a robust --aggregate"),
    (["--attack", "ipm", "--attackers", "4", "--workers", "4"], "fewer than --workers"),
    (["--attack", "ipm"], "needs --attackers 1"),
    (["--attackers", "1"], "needs an --attack"),
    (["--attack", "nope", "--attackers", "1"], "unknown --attack"),
    (["--aggregate", "median", "--algo", "noloco"], "--aggregate and --attack apply to --algo"),
    (["--stragglers", "1", "--algo", "diloco"], "apply to --algo ddp, not diloco"),
    (["--stragglers", "4", "--workers", "4"], "0 <= s <= n - 1"),
    (["--stragglers", "2", "--workers", "4", "--gradient-code", "fr"], "s + 1 to divide n"),
    (["--stragglers", "1", "--aggregate", "median"], "does not combine"),
    (["--gradient-code", "fr"], "needs --stragglers"),
    (["--attack", "ipm", "--attackers", "1", "--attackers-at", "middle"], "--attackers-at must be"),
    (["--aggregate", "median", "--krum-neighbours", "byzfl"], "applies to --aggregate krum"),
    (
        [
            "--aggregate",
            "krum",
            "--byzantine-tolerance",
            "1",
            "--workers",
            "5",
            "--krum-neighbours",
            "all",
        ],
        "--krum-neighbours must be paper or byzfl",
    ),
    (
        ["--seq-parallel", "ring", "--cp", "2", "--aggregate", "median"],
        "--seq-parallel does not combine with --aggregate and --attack: the ranks of a --cp group",
    ),
    (
        ["--stragglers", "1", "--seq-parallel", "ring", "--cp", "2"],
        "--stragglers (gradient coding) does not combine with --seq-parallel",
    ),
    (["--straggler-delay", "0.5"], "needs --slow-workers"),
    (["--slow-workers", "1"], "needs a --straggler-delay"),
]


@pytest.mark.parametrize("flags, message", BAD)
def test_bad_combinations_exit_2_with_one_line(flags, message, tmp_path, capsys):
    assert main(["train", *flags, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert message in err[0], err[0]
    assert not (tmp_path / "x").exists()


def test_bits_apply_to_ddp_gathered_or_all_reduced():
    from lowband.cli import validate

    validate(TrainConfig(aggregate="median", options={"bits": 8}))
    validate(dataclasses.replace(TrainConfig(), attack="ipm", attackers=1, options={"bits": 4}))
    validate(TrainConfig(options={"bits": 8}))  # plain DDP: a quantized all-reduce


def test_robust_ddp_resumes_centered_clipping_state():
    """A checkpoint keeps centered clipping's reference: 2 + 2 steps == 4 steps."""

    def body(comm, split):
        def fresh():
            model = build_model(CFG, seed=1)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            return model, opt, DDP(model, opt, comm, reducer=RobustReducer(comm, "cc", 0))

        model, opt, algo = fresh()
        out = []
        for step in range(4):
            if step == split:
                state = (model.state_dict(), opt.state_dict(), algo.state_dict())
                model, opt, algo = fresh()
                model.load_state_dict(state[0])
                opt.load_state_dict(state[1])
                algo.load_state_dict(state[2])
            model.loss(*batch(comm.rank, step)).backward()
            algo.sync_gradients()
            out.append(grads_of(model).clone())
            opt.step()
            opt.zero_grad()
            algo.step()
        return out

    straight, resumed = run_ranks(3, body, -1), run_ranks(3, body, 2)
    for a, b in zip(straight[0], resumed[0]):
        assert torch.equal(a, b)


def test_attackers_can_sit_anywhere():
    assert attacker_ranks(10, 3) == [7, 8, 9]
    assert attacker_ranks(10, 3, "first") == [0, 1, 2]
    drawn = attacker_ranks(10, 3, "random", seed=5)
    assert drawn == attacker_ranks(10, 3, "random", seed=5)  # the same on every worker
    assert len(set(drawn)) == 3 and all(0 <= r < 10 for r in drawn)
    assert {tuple(attacker_ranks(10, 3, "random", seed=s)) for s in range(20)} != {tuple(drawn)}


def test_krum_neighbours_reach_the_rule():
    from lowband.algorithms.robust import build_reducer
    from lowband.robust.aggregators import krum

    # 9 rows, f = 2: the paper's 5 neighbours and byzfl's 6 pick different rows here
    x = torch.randn(9, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert not torch.equal(krum(x, 2, slack=1), krum(x, 2, slack=2))
    for choice, slack in (("byzfl", 1), ("paper", 2)):
        cfg = TrainConfig(
            workers=9, aggregate="krum", byzantine_tolerance=2, krum_neighbours=choice
        )
        reducer = build_reducer(cfg, Comm(None), get_codec(32))
        assert torch.equal(reducer._make()(x), krum(x, 2, slack=slack))
