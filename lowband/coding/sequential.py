"""Sequential gradient coding (Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding for
Straggler Mitigation", ICLR 2023): plan a stream of jobs (one gradient per round) so that each is
decodable within T rounds while workers straggle in bursts.

Everything here is planning: which task every worker computes in every round, given the stragglers
seen so far, and which job is decodable when. Pure Python, no tensors, no communication; the
training loop (or lowband.coding.straggler) executes the plan.

Source. The rules below follow the authors' simulator (github.com/mamaj/Sequential-Gradient-Coding-2,
2_find_runtimes/analyze_delay_profiles/selective_repeat_sgc.py and multiplexed_sgc.py): straggler
model check, task choice, decodability test and normalized loads are taken from there. The paper's
proofs (that every job is decodable under the model) are not reproduced; tests/test_coding.py
checks that claim on random conforming patterns instead.

(B, W, lambda)-bursty stragglers: in every window of W consecutive rounds
  1. at most lambda distinct workers straggle, and
  2. each worker's straggling rounds lie within B consecutive rounds (a burst of length <= B).
A round whose stragglers would break the model is run to completion (the master waits for
everybody), as in the authors' simulator: `observe(..., enforce_model=True)`.

SR-SGC (selective repeat). Needs B | (W - 1). An (n, s) gradient code with
s = ceil(B lambda / (W - 1 + B)); delay T = B; load (s + 1)/n of a job per worker per round.
In round t every worker computes its job-t task, except: if v > s workers failed to deliver job
t - B in round t - B, the first v - s of them (by index) redo their job-(t - B) task instead.
Job j is decodable at the end of round j + B if n - s distinct workers delivered its task.

M-SGC (multiplexed). Needs 1 <= B < W. Every round a worker computes W - 1 + B minitasks, slot m
belonging to job t - m (a job is spread along a diagonal of W - 1 + B rounds); delay
T = W - 2 + B. Each job's data is split into n (W - 1) uncoded chunks (worker i owns W - 1 of them)
and B groups coded with an (n, lambda) gradient code. Slots 0..W-2 compute the worker's uncoded
chunks; slot W - 1 + g computes coded group g if the worker has delivered all W - 1 of its chunks
for that job, else it redoes a missing chunk. Job j is decodable at the end of round j + T if every
worker delivered its W - 1 chunks and every group has n - lambda coded results. Load per worker per
round: (lambda+1)(W-1+B) / (n (B + (W-1)(lambda+1))) for lambda < n, (W-1+B) / (n (W-1)) for
lambda = n (then there are no coded groups).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lowband.coding.encoders import GradientCode, cyclic_mds
from lowband.errors import ConfigError

__all__ = ["BurstyStragglerModel", "Minitask", "MultiplexedSGC", "SelectiveRepeatSGC"]

Stragglers = frozenset[int]


@dataclass(frozen=True)
class BurstyStragglerModel:
    """The (B, W, lambda)-bursty straggler model (module docstring)."""

    B: int
    """Longest burst: a worker straggles in at most B consecutive rounds of any window."""
    W: int
    """Window length in rounds."""
    lam: int
    """Most distinct stragglers in any window of W rounds."""

    def __post_init__(self) -> None:
        if not (1 <= self.B < self.W) or self.lam < 1:
            raise ConfigError(
                f"the bursty straggler model needs 1 <= B < W and lambda >= 1, "
                f"got B = {self.B}, W = {self.W}, lambda = {self.lam}"
            )

    def admits(self, history: Sequence[Stragglers], stragglers: Iterable[int]) -> bool:
        """Whether `stragglers` in the round after `history` keeps the pattern in the model."""
        now = frozenset(stragglers)
        r = len(history)
        window = history[max(0, r + 1 - self.W) : r]
        if len(now.union(*window)) > self.lam:
            return False
        early = history[max(0, r + 1 - self.W) : max(0, r + 1 - self.B)]  # rounds r-W+1..r-B
        return not any(now & past for past in early)

    def conforms(self, pattern: Sequence[Iterable[int]]) -> bool:
        """Whether a whole pattern (stragglers per round) is in the model."""
        rounds = [frozenset(p) for p in pattern]
        return all(self.admits(rounds[:r], rounds[r]) for r in range(len(rounds)))

    def sample(
        self, n: int, rounds: int, p: float = 0.2, p_continue: float = 0.7, seed: int = 0
    ) -> list[Stragglers]:
        """A random pattern in the model: a worker starts a burst with probability p and extends
        it with probability p_continue; proposals that would leave the model are dropped."""
        rng = random.Random(seed)
        out: list[Stragglers] = []
        for r in range(rounds):
            chosen: set[int] = set()
            for i in rng.sample(range(n), n):
                prev = r > 0 and i in out[r - 1]
                if rng.random() < (p_continue if prev else p) and self.admits(out, chosen | {i}):
                    chosen.add(i)
            out.append(frozenset(chosen))
        return out


class _Planner:
    """Shared bookkeeping: jobs, rounds, observed stragglers, and the model check."""

    delay: int

    def __init__(self, n: int, B: int, W: int, lam: int, jobs: int) -> None:
        self.model = BurstyStragglerModel(B, W, lam)
        if lam > n:
            raise ConfigError(f"lambda = {lam} stragglers cannot exceed n = {n} workers")
        if jobs < 1:
            raise ConfigError(f"need at least one job, got {jobs}")
        self.n, self.B, self.W, self.lam, self.jobs = n, B, W, lam, jobs
        self.stragglers: list[Stragglers] = []
        """Effective stragglers of each observed round."""

    @property
    def rounds(self) -> int:
        """Rounds to finish every job: jobs + delay."""
        return self.jobs + self.delay

    def deadline(self, job: int) -> int:
        """The round at whose end `job` is decodable."""
        return job + self.delay

    def _check_next(self, round_: int) -> None:
        if round_ != len(self.stragglers):
            raise ValueError(f"plan/observe round {round_}, expected {len(self.stragglers)}")

    def _effective(self, stragglers: Iterable[int], enforce_model: bool) -> Stragglers:
        s = frozenset(int(i) for i in stragglers)
        if any(not 0 <= i < self.n for i in s):
            raise ValueError(f"stragglers {sorted(s)} must be workers in 0..{self.n - 1}")
        if enforce_model and not self.model.admits(self.stragglers, s):
            return frozenset()  # outside the model: wait for everybody this round
        return s

    def run(self, pattern: Sequence[Iterable[int]], enforce_model: bool = True) -> list[bool]:
        """Plan and observe every round of `pattern` (padded with no stragglers); return, per
        job, whether it was decodable by its deadline."""
        for r in range(len(self.stragglers), self.rounds):
            self.plan(r)
            self.observe(r, pattern[r] if r < len(pattern) else (), enforce_model)
        return [self.decodable(j) for j in range(self.jobs)]


class SelectiveRepeatSGC(_Planner):
    """SR-SGC planner. plan(r) -> the job whose coded task each worker computes in round r."""

    def __init__(self, n: int, B: int, W: int, lam: int, jobs: int, seed: int = 0) -> None:
        super().__init__(n, B, W, lam, jobs)
        if (W - 1) % B:
            raise ConfigError(f"SR-SGC needs B to divide W - 1: got B = {B}, W = {W}")
        self.s = math.ceil(B * lam / (W - 1 + B))
        """Stragglers the per-round gradient code tolerates."""
        if self.s >= n:
            raise ConfigError(
                f"SR-SGC needs s = ceil(B lambda / (W - 1 + B)) < n, got s = {self.s}"
            )
        self.delay = B
        self.load = (self.s + 1) / n
        """Fraction of one job's data each worker processes per round."""
        self.code: GradientCode = cyclic_mds(n, self.s, seed)
        """The (n, s) gradient code every job's tasks use."""
        self._tasks: list[tuple[int | None, ...]] = []

    def plan(self, round_: int) -> tuple[int | None, ...]:
        """Per worker, the job whose task it computes in round_ (None: nothing left to do)."""
        self._check_next(round_)
        if round_ < len(self._tasks):
            return self._tasks[round_]
        tasks: list[int | None] = [round_ if round_ < self.jobs else None] * self.n
        old = round_ - self.B
        if 0 <= old < self.jobs:
            missing = [i for i in range(self.n) if not self._delivered(i, old)]
            for i in missing[: max(0, len(missing) - self.s)]:
                tasks[i] = old  # selective repeat
        self._tasks.append(tuple(tasks))
        return self._tasks[round_]

    def observe(
        self, round_: int, stragglers: Iterable[int], enforce_model: bool = True
    ) -> Stragglers:
        """Record round_'s stragglers (after plan(round_)); returns the effective set."""
        self._check_next(round_)
        if len(self._tasks) <= round_:
            raise ValueError(f"plan({round_}) before observe({round_})")
        eff = self._effective(stragglers, enforce_model)
        self.stragglers.append(eff)
        return eff

    def _delivered(self, worker: int, job: int) -> bool:
        return any(
            r < len(self.stragglers)
            and self._tasks[r][worker] == job
            and worker not in self.stragglers[r]
            for r in (job, job + self.B)
        )

    def contributors(self, job: int) -> list[int]:
        """Workers whose task for `job` has been received so far."""
        return [i for i in range(self.n) if self._delivered(i, job)]

    def decodable(self, job: int) -> bool:
        return len(self.contributors(job)) >= self.n - self.s


@dataclass(frozen=True)
class Minitask:
    """One slot of a worker's round in M-SGC."""

    job: int
    coded: bool
    """False: one of the worker's W - 1 uncoded chunks; True: its task of a coded group."""
    index: int
    """The chunk (0..W-2) when uncoded, the group (0..B-1) when coded."""


class MultiplexedSGC(_Planner):
    """M-SGC planner. plan(r) -> per worker, its W - 1 + B minitasks of round r."""

    def __init__(self, n: int, B: int, W: int, lam: int, jobs: int, seed: int = 0) -> None:
        super().__init__(n, B, W, lam, jobs)
        self.slots = W - 1 + B
        self.delay = W - 2 + B
        if lam == n:
            self.load = (W - 1 + B) / (n * (W - 1))
            self.code: GradientCode | None = None
        else:
            self.load = (lam + 1) * (W - 1 + B) / (n * (B + (W - 1) * (lam + 1)))
            self.code = cyclic_mds(n, lam, seed)
        """The (n, lambda) gradient code of every coded group (None when lambda = n)."""
        # Fractions of a job's data: n (W-1) uncoded chunks and B coded groups; a minitask is the
        # same amount of work either way (a chunk, or (lambda+1)/n of a group).
        self.chunk_fraction = self.load / self.slots
        self.group_fraction = 0.0 if self.code is None else self.chunk_fraction * n / (lam + 1)
        self._plans: list[tuple[tuple[Minitask | None, ...], ...]] = []

    def plan(self, round_: int) -> tuple[tuple[Minitask | None, ...], ...]:
        self._check_next(round_)
        if round_ < len(self._plans):
            return self._plans[round_]
        plan = []
        for i in range(self.n):
            row: list[Minitask | None] = []
            for m in range(self.slots):
                job = round_ - m
                if not 0 <= job < self.jobs:
                    row.append(None)
                elif m < self.W - 1:
                    row.append(Minitask(job, False, m))
                else:
                    missing = self._missing_chunks(i, job)
                    # lambda = n has no coded groups: the slot only ever redoes a chunk
                    if missing or self.code is None:
                        row.append(Minitask(job, False, missing[0]) if missing else None)
                    else:
                        row.append(Minitask(job, True, m - (self.W - 1)))
            plan.append(tuple(row))
        self._plans.append(tuple(plan))
        return self._plans[round_]

    def observe(
        self, round_: int, stragglers: Iterable[int], enforce_model: bool = True
    ) -> Stragglers:
        self._check_next(round_)
        if len(self._plans) <= round_:
            raise ValueError(f"plan({round_}) before observe({round_})")
        eff = self._effective(stragglers, enforce_model)
        self.stragglers.append(eff)
        return eff

    def _delivered(self, worker: int, job: int) -> list[Minitask]:
        out = []
        for m in range(self.slots):
            r = job + m
            if r < len(self.stragglers) and worker not in self.stragglers[r]:
                t = self._plans[r][worker][m]
                if t is not None:
                    out.append(t)
        return out

    def _missing_chunks(self, worker: int, job: int) -> list[int]:
        done = {t.index for t in self._delivered(worker, job) if not t.coded}
        return [c for c in range(self.W - 1) if c not in done]

    def coded_results(self, job: int, group: int) -> list[int]:
        """Workers whose coded task of `group` for `job` has been received."""
        return [
            i
            for i in range(self.n)
            if any(t.coded and t.index == group for t in self._delivered(i, job))
        ]

    def decodable(self, job: int) -> bool:
        if any(self._missing_chunks(i, job) for i in range(self.n)):
            return False
        if self.code is None:
            return True
        return all(len(self.coded_results(job, g)) >= self.n - self.lam for g in range(self.B))
