"""Elastic training on torchft (`lowband train --elastic`): chaos tests with real processes.

Every test runs the CLI with real worker processes, a real torchft Lighthouse and real faults
(SIGKILL, SIGSTOP, a throttled link, a newcomer, a wrong secret), then checks from the metrics
that the run completed, that after every committed synchronisation all participants' shared
state was bit-identical (each worker logs its own digest before any repair), that committed
steps are applied exactly once, and that the final loss is close to a fault-free run.

Time goes to process start-up (~2.5 s of CPU per worker) and to the waits the faults cause, so the
suite runs as few elastic jobs as it can: fault-free references run their workers as threads
(threaded_runs: same numbers bit for bit, no process launch to test there), and faults that do not
interfere share one job (the throttled link rides on the kill -9 job, its assertions in their own
test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RUST_LOG", "warn")  # before torchft's first import: it reads it once
import torchft  # noqa: E402, F401  - --elastic is built on it; make installs lowband[elastic]
from threaded_runs import workers_as_threads  # noqa: E402

from lowband.cli import main  # noqa: E402
from lowband.report import write_report  # noqa: E402
from lowband.report.runs import load_run  # noqa: E402

FAST = ["--model", "1m", "--batch-size", "4", "--seq-len", "64", "--eval-batches", "2",
        "--log-every", "1", "--threads", "1"]  # fmt: skip
DILOCO = ["--algo", "diloco", "--sync-every", "10", "--steps", "100", "--eval-every", "50"]


def _train(tmp_path: Path, name: str, *flags: str) -> Path:
    out = tmp_path / name
    assert main(["train", "--out", str(out), *FAST, *flags]) == 0
    return out


def _reference(tmp_path: Path, name: str, *flags: str) -> Path:
    """A fault-free *static* run of the same flags, its workers as threads (threaded_runs). Without
    faults the elastic path gives the static path's numbers bit for bit (asserted for the CLI by
    test_fault_free_elastic_equals_plain_diloco, per algorithm by test_sync_group), so this is the
    fault-free elastic run's loss without its ~4 s of process start-up."""
    assert "--elastic" not in flags
    with workers_as_threads():
        return _train(tmp_path, name, *flags)


def _loss(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["final_eval_loss"]


def _records(run: Path) -> dict[int, list[dict]]:
    out = {}
    for f in sorted((run / "metrics").glob("rank*.jsonl")):
        out[int(f.stem[4:])] = [json.loads(line) for line in f.read_text().splitlines() if line]
    return out


def _events(run: Path, kind: str) -> list[dict]:
    events = [r for recs in _records(run).values() for r in recs if r.get("event") == kind]
    launcher = run / "metrics" / "events.jsonl"
    if launcher.exists():
        events += [
            e for e in map(json.loads, launcher.read_text().splitlines()) if e["event"] == kind
        ]
    return events


def _check_invariants(
    run: Path, syncs: int, shared_state: bool = True, first_round_commits: bool = True
) -> None:
    """Bit-parity per committed step, exactly-once commits, every worker finished."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["elastic"]["failed"] == []
    digests: dict[int, set[str]] = defaultdict(set)
    for rank, recs in _records(run).items():
        steps = [r for r in recs if "event" not in r]
        committed = [r["committed"] for r in steps]
        assert committed == sorted(committed), f"rank {rank}: committed counter went back"
        outer = [r["outer_step"] for r in steps if "outer_step" in r]
        assert outer == sorted(outer)
        # torchft's commit counter (from 1) and the applied outer steps move together: an update
        # lost or applied twice would break this on the worker where it happened.
        # (CO2's first round applies nothing and commits nothing: from then on the two are equal.)
        if shared_state:
            for r in (r for r in steps if "outer_step" in r):
                behind = 0 if first_round_commits or r["outer_step"] == 0 else 1
                assert r["outer_step"] == r["committed"] - 1 + behind, r
        for r in steps:
            if r.get("shared_digest") is not None:
                digests[r["committed"]].add(r["shared_digest"])
        last = steps[-1]
        if "outer_step" in last:  # DiLoCo: every sync committed exactly once, none lost
            assert last["outer_step"] == syncs, (rank, last["outer_step"], syncs)
    # Fewer contributors than participants only in a round where a worker healed (its zeros are
    # left out of the mean); in every other round everybody's update counts.
    short = {
        r["committed"]
        for recs in _records(run).values()
        for r in recs
        if "event" not in r and r["contributors"] < r["participants"]
    }
    # (With an overlap the round's quorum comes a step before its commit: a heal can show on the
    # lines of two consecutive commit counts, never on more.)
    runs = [c for c in sorted(short) if c - 1 not in short]
    assert len(runs) <= len(_events(run, "recovered")), sorted(short)
    assert all(c + 2 not in short for c in runs), sorted(short)
    assert bool(digests) == shared_state, "parity digests logged where expected"
    for committed, seen in digests.items():
        assert len(seen) == 1, f"shared state differed across workers after commit {committed}"
    assert not _events(run, "parity_mismatch")


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory) -> dict[str, float]:
    """Fault-free references: non-elastic DiLoCo, and the same run under --elastic."""
    tmp = tmp_path_factory.mktemp("ref")
    plain = _reference(tmp, "plain", "--workers", "3", *DILOCO)
    elastic = _train(tmp, "elastic", "--workers", "3", "--elastic", *DILOCO)
    return {"plain": _loss(plain), "elastic": _loss(elastic), "elastic_run": elastic}


def test_fault_free_elastic_equals_plain_diloco(fault_free):
    # Same seeds, same data, the same reductions: only the membership layer is added.
    assert fault_free["elastic"] == pytest.approx(fault_free["plain"], rel=1e-5)
    _check_invariants(fault_free["elastic_run"], syncs=10)


@pytest.fixture(scope="module")
def kill_run(tmp_path_factory) -> Path:
    """Two kill -9s and their restarts, and (from step 40, on worker 0, which is never killed) a
    link throttled 100x: one job for test_kill_9_and_restart_loses_nothing and
    test_throttled_link_completes. The emulated link changes timings, never numbers."""
    return _train(
        tmp_path_factory.mktemp("kill"), "kill", "--workers", "3", "--elastic", *DILOCO,
        "--fail-at", "2:15,1:54", "--restarts", "2",
        "--link", "10gbit:1ms", "--throttle-at", "0:40:100",
    )  # fmt: skip


def test_kill_9_and_restart_loses_nothing(tmp_path, kill_run, fault_free):
    run = kill_run
    assert len(_events(run, "worker_died")) == 2
    assert len(_events(run, "worker_restarted")) == 2
    recovered = _events(run, "recovered")
    assert len(recovered) == 2 and all(e["bytes"] > 0 for e in recovered)
    _check_invariants(run, syncs=10)
    loss = json.loads((run / "summary.json").read_text())["final_eval_loss"]
    assert loss == pytest.approx(fault_free["elastic"], rel=0.03)

    # The report shows it: failures, recoveries, and who took part in each synchronisation.
    elastic = load_run(run).elastic()
    assert (elastic["failures"], elastic["restarts"], elastic["recoveries"]) == (2, 2, 2)
    assert all(s > 0 for s in elastic["recovery_s"])
    index = write_report([run], tmp_path / "report")
    assert (tmp_path / "report" / "participants.png").stat().st_size > 0
    page = index.read_text()
    assert "worker failures" in page and "participants.png" in page


@pytest.mark.parametrize(
    "algo",
    [
        ["--algo", "ddp", "--steps", "30", "--eval-every", "30"],
        ["--algo", "streaming-diloco", "--sync-every", "8", "--fragments", "2", "--overlap", "1",
         "--steps", "40", "--eval-every", "40"],
        ["--algo", "noloco", "--sync-every", "8", "--steps", "40", "--eval-every", "40"],
        # CO2 averages one round late, so a missing worker weighs on two rounds: a longer run.
        ["--algo", "co2", "--sync-every", "8", "--steps", "80", "--eval-every", "80"],
        # SparseLoCo: the killed worker's error-feedback buffer is lost with it, the restart
        # heals with an empty one (docs/diloco.md says what that costs)
        ["--algo", "diloco", "--sync-every", "8", "--compress", "topk:0.05:2", "--outer-lr",
         "1.0", "--steps", "40", "--eval-every", "40"],
    ],
    ids=["ddp", "streaming", "noloco", "co2", "sparse"],
)  # fmt: skip
def test_kill_9_under_ddp_and_streaming(tmp_path, algo):
    ref = _reference(tmp_path, "ref", "--workers", "3", *algo)
    run = _train(
        tmp_path, "kill", "--workers", "3", "--elastic", *algo, "--fail-at", "1:13",
        "--restarts", "1",
    )  # fmt: skip
    assert len(_events(run, "recovered")) == 1
    syncs = {"streaming-diloco": 10, "noloco": 5, "co2": 10, "diloco": 5}.get(algo[1], 0)
    # NoLoCo's replicas differ by design: no shared state to compare.
    _check_invariants(
        run,
        syncs=syncs,
        shared_state=algo[1] != "noloco",
        first_round_commits=algo[1] != "co2",
    )
    assert _loss(run) == pytest.approx(_loss(ref), rel=0.03)


def test_sigstop_past_the_timeout_then_sigcont(tmp_path, fault_free):
    run = _train(
        tmp_path, "stall", "--workers", "3", "--elastic", *DILOCO,
        "--stall-at", "1:12:4", "--heartbeat-timeout", "1.5", "--timeout", "3",
        "--join-timeout", "2", "--link", "1gbit:150ms",
    )  # fmt: skip
    # The link's latency keeps the others busy for longer than the stall on any machine, so the
    # stopped worker wakes up mid-run: every sync takes several 150 ms hops (~0.6 s of sleeping
    # on the link alone), and after the heartbeat timeout the other two still have 8 syncs to do
    # (~5 s with no compute at all) when it wakes 4 s after it stopped. It heals at about the
    # 6th sync on this 2-core machine, with a few left to spare.
    # The others went on without the stopped worker; when it woke up it was behind and healed.
    assert _events(run, "recovered"), "the stalled worker did not heal from a live peer"
    quorums = [e["participants"] for e in _events(run, "quorum")]
    assert 2 in quorums, quorums
    _check_invariants(run, syncs=10)
    loss = json.loads((run / "summary.json").read_text())["final_eval_loss"]
    assert loss == pytest.approx(fault_free["elastic"], rel=0.03)  # the link changes no numbers


def test_throttled_link_completes(kill_run):
    # The throttle rides on the kill -9 job (kill_run): the job completes all the same.
    run = kill_run
    throttled = _events(run, "throttled")
    assert len(throttled) == 1 and throttled[0]["replica"] == "replica_0", throttled
    _check_invariants(run, syncs=10)
    last = [x for x in _records(run)[0] if "event" not in x][-1]
    # From step 40 worker 0 has 100 Mbit/s: each of its 6 later syncs puts ~4.5 MB (fp32
    # all-to-all + all-gather of the 0.85M-parameter pseudo-gradient, 2/3 each) on its uplink,
    # ~0.36 s; the emulation must have charged them. (Unthrottled, a worker of this job spends
    # ~0.3 s in all: the waits for the killed workers are quorum time, not comm time.)
    assert last["comm_time"] > 1.0, last["comm_time"]


def _start_job(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, Path]:
    run = tmp_path / "job"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowband.cli", "train", "--out", str(run), *FAST, "--elastic",
         *flags],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (run / "elastic.json").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the job never wrote elastic.json"
        time.sleep(0.2)
    return proc, run


def _join(run: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lowband.cli", "join", str(run), *flags],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_newcomer_joins_mid_run_and_a_wrong_token_is_refused(tmp_path):
    proc, run = _start_job(
        tmp_path, "--workers", "2", "--algo", "diloco", "--sync-every", "10", "--steps", "80",
        "--eval-every", "40",
    )  # fmt: skip
    try:
        wrong = _join(run, "--token", "not-the-secret")
        assert wrong.returncode == 2
        assert "admission refused" in wrong.stderr and "Traceback" not in wrong.stderr
        joiner = _join(run)  # same host: the secret comes from RUN/secret
        assert joiner.returncode == 0, joiner.stderr[-2000:]
        assert "admitted" in joiner.stderr
    finally:
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    records = _records(run)
    assert 2 in records, "the newcomer logged nothing"
    assert [e for e in records[2] if e.get("event") == "recovered"]
    assert max(e["participants"] for e in _events(run, "quorum")) == 3
    refused = _events(run, "admission_refused")
    assert len(refused) == 1 and refused[0]["joiner"] is not None
    assert len(_events(run, "admitted")) == 1
    _check_invariants(run, syncs=8)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--restarts", "1"], "--restarts needs --elastic"),
        (["--elastic", "--stragglers", "1"], "--elastic does not combine with --stragglers"),
        (["--elastic", "--seq-parallel", "ring", "--cp", "2"], "fixed groups of --cp ranks"),
        (
            ["--elastic", "--workers", "5", "--aggregate", "krum", "--byzantine-tolerance", "1"],
            "--min-workers 1 is too few",
        ),
        (["--elastic", "--min-workers", "5"], "--min-workers must be between"),
        (["--elastic", "--timeout", "0"], "--timeout must be positive"),
        (["--elastic", "--stall-at", "1:2"], "--stall-at takes RANK:STEP:SECONDS"),
        (["--elastic", "--throttle-at", "1:2:10"], "--throttle-at slows the emulated link"),
        (["--fail-at", "1:x"], "--fail-at takes RANK:STEP"),
        (["--fail-at", "1:3,7:3"], "RANK must be below --workers"),
    ],
)
def test_bad_elastic_flags_fail_in_one_line(tmp_path, capsys, flags, message):
    assert main(["train", "--out", str(tmp_path / "x"), "--workers", "4", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_join_without_a_job_fails_in_one_line(tmp_path, capsys):
    assert main(["join", str(tmp_path)]) == 2
    assert "not a running elastic job" in capsys.readouterr().err


def test_losing_every_worker_that_held_the_state_fails_clearly(tmp_path, capsys):
    # Both workers die at the same step; their restarts find nobody to heal from. The job must
    # stop with one clear line, not restart them forever.
    out = tmp_path / "lost"
    code = main(
        ["train", "--out", str(out), *FAST, "--workers", "2", "--elastic", *DILOCO,
         "--fail-at", "0:12,1:12", "--restarts", "10", "--heartbeat-timeout", "1"]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "no live worker holds the job's state" in err and "Traceback" not in err
    restarts = _events(out, "worker_restarted")
    assert 2 <= len(restarts) <= 4, restarts  # one restart round, not a crash loop


def test_elastic_and_byzantine_robust_together_survive_a_kill(tmp_path):
    # 4 workers, the last one a sign-flip attacker; trimmed mean tolerating it over every quorum
    # (--min-workers 3: no round commits with fewer); an honest worker is killed and restarts.
    robust = ["--workers", "4", "--aggregate", "trimmed-mean", "--byzantine-tolerance", "1",
              "--attack", "sign-flip", "--attackers", "1", *DILOCO,
              "--steps", "60", "--eval-every", "60"]  # fmt: skip
    ref = _reference(tmp_path, "ref", *robust)
    run = _train(
        tmp_path, "kill", *robust, "--elastic", "--min-workers", "3", "--fail-at", "1:15",
        "--restarts", "1",
    )  # fmt: skip
    assert len(_events(run, "worker_died")) == 1
    assert len(_events(run, "recovered")) == 1
    _check_invariants(run, syncs=6)
    assert _loss(run) == pytest.approx(_loss(ref), rel=0.03)


def test_every_worker_dies_and_the_job_resumes_from_its_checkpoint(tmp_path, capsys, fault_free):
    out = tmp_path / "all"
    flags = ["--workers", "3", "--elastic", *DILOCO, "--ckpt-every", "20"]
    code = main(["train", "--out", str(out), *FAST, *flags, "--fail-at", "0:25,1:25,2:25"])
    assert code == 1 and "every worker failed" in capsys.readouterr().err
    saved = {c.name: c for c in (out / "ckpt").iterdir()}
    assert "step_0000020" in saved  # the quorum's state at step 20
    digest = torch.load(saved["step_0000020"] / "rank0.pt", weights_only=False)["digest"]

    assert main(["train", "--resume", str(out)]) == 0
    resumed = _events(out, "resumed")
    assert len(resumed) == 3  # every worker, from the same state, bit for bit
    assert {e["from_step"] for e in resumed} == {20} and {e["digest"] for e in resumed} == {digest}
    _check_invariants(out, syncs=10)
    loss = json.loads((out / "summary.json").read_text())["final_eval_loss"]
    assert loss == pytest.approx(fault_free["elastic"], rel=0.03)


def test_a_restart_killed_while_it_joins_or_heals_is_just_another_failure(tmp_path):
    # Worker 1 dies at step 12; its first restart is killed 0.3 s after joining (waiting for its
    # quorum), its second 1.2 s after (the 100 Mbit/s link makes the ~17 MB heal last ~1.4 s);
    # the third heals. The survivors must not go down with the joiners, and nothing is lost.
    # The survivors wait for each joiner at their next sync, so the third heals at about sync 40
    # whatever the machine's speed; 100 steps leave 6 syncs to spare.
    run = _train(
        tmp_path, "joinkill", "--workers", "3", "--elastic", *DILOCO, "--fail-at", "1:12",
        "--restarts", "4", "--kill-joiner", "0.3,1.2", "--link", "100mbit:5ms",
        "--heartbeat-timeout", "2", "--timeout", "10",
        "--steps", "100", "--eval-every", "100",  # long enough for the third restart to heal
    )  # fmt: skip
    died = _events(run, "worker_died")
    assert [e["index"] for e in died] == [1, 1, 1], died  # the kill -9, then the two joiners
    assert len(_events(run, "worker_restarted")) == 3
    assert _events(run, "recovered"), "the last restart never healed"
    # A round a joiner died in is discarded by everybody (never applied): the others train on.
    discarded = {e["local_step"] for e in _events(run, "sync_discarded") if e["rank"] == 0}
    assert len(discarded) <= 2, discarded
    _check_invariants(run, syncs=10 - len(discarded))


def test_fault_tolerance_in_your_own_loop(tmp_path):
    """examples/elastic_own_loop.py: two workers under a Lighthouse; one is killed (-9) mid-run
    and started again with --join; it heals from the survivor and both end bit-identical."""
    import lowband

    example = Path(__file__).resolve().parent.parent / "examples" / "elastic_own_loop.py"
    lighthouse = lowband.start_lighthouse(1, join_timeout_s=3, heartbeat_timeout_s=2)
    # 400 steps: the survivor waits for the rejoining worker only as long as its heartbeat and
    # join timeouts (2-3 s), then trains on alone; the rejoined process must start (import torch,
    # build its model) and heal before the survivor's last sync even on a loaded machine. (200
    # steps were tried: the survivor finished first under a heavy parallel load.)
    common = ["--lighthouse", lighthouse.address(), "--steps", "400", "--sync-every", "20"]

    def start(*flags: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(example), *common, *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    try:
        survivor, victim = start("--replica", "0"), start("--replica", "1")
        for line in victim.stdout:  # let it train and commit a few rounds, then kill -9
            if "step 60 " in line:
                break
        victim.kill()
        victim.communicate(timeout=30)
        rejoined = start("--replica", "1", "--join")
        out_new, _ = rejoined.communicate(timeout=300)
        out_old, _ = survivor.communicate(timeout=300)
    finally:
        lighthouse.shutdown()
    assert survivor.returncode == 0 and rejoined.returncode == 0, out_old[-2000:] + out_new[-2000:]
    assert "replica 1 healed at step" in out_new
    final = [line.split()[-1] for out in (out_old, out_new) for line in out.splitlines()
             if "done: global parameters" in line]  # fmt: skip
    assert len(final) == 2 and final[0] == final[1], (out_old[-1500:], out_new[-1500:])
