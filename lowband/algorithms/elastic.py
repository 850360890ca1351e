"""The elastic forms of DDP, DiLoCo and Streaming DiLoCo (`lowband train --elastic`).

Each subclass keeps its parent's update rule and changes only what happens around a
synchronisation (lowband.fault.elastic describes the protocol):

  * before it: `membership.quorum()` picks the participants and may *heal* this worker (load a
    live peer's whole state); the reduction then runs over the quorum's Comm;
  * the reduction: a worker that has just healed contributes zeros, and every contribution is
    scaled by (participants / contributors), so the average is over the workers that really
    trained;
  * after it: `membership.commit()`; a failed or uncommitted synchronisation is discarded
    (DDP: no optimizer step; DiLoCo: the fragment returns to the last global parameters, as
    torchft's DiLoCo does) and never applied twice;
  * after a committed outer step: a bit-parity check of the shared state over the quorum
    (lowband.fault.parity), repairing a rank that disagrees with the majority.

A newcomer (`join=True`) calls the same hook on its first iteration without having trained: its
quorum heals it to its source's state at the source's synchronisation point, and it then takes
part in that synchronisation like everybody else.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lowband.algorithms.base import Algorithm, flat_params, write_flat
from lowband.algorithms.co2 import CO2, co2_outer_step, staleness_penalty
from lowband.algorithms.ddp import DDP
from lowband.algorithms.diloco import StreamingDiLoCo
from lowband.algorithms.noloco import NoLoCo, noloco_groups
from lowband.comm import quantized_all_reduce, quantized_all_reduce_bytes
from lowband.errors import ConfigError
from lowband.fault.detector import Detector
from lowband.fault.parity import check_parity, shared_state_of, state_digest


class _Elastic:
    """What the elastic algorithms share: the membership, events and a parity check."""

    membership: Any = None
    joining = False
    parity_every = 1

    def attach(
        self, membership, *, join: bool, on_event, parity_every: int = 1, detect_every: int = 10
    ) -> None:
        self.membership = membership
        self.joining = join
        self.on_event = on_event
        self.parity_every = parity_every
        self.detect_every = detect_every
        # Every participant computes the same verdict; only the flagged worker logs it (once).
        self.detector = Detector(
            membership.comm,
            on_event=lambda e: on_event(e) if e.get("rank") == self.comm.rank else None,
        )
        self.failed_syncs = 0
        self.parity_repairs = 0
        self.last_sync_s = 0.0
        self.shared_digest: str | None = None
        """This rank's digest of its shared state at the last parity check (before any repair)."""
        self._t_sync = 0.0
        self._new_quorum = False

    def _quorum(self):
        self._t_sync = time.perf_counter()
        before = self.membership.comm
        comm = self.membership.quorum()
        self._new_quorum = comm is not before
        if self.detector.comm is not comm:  # a new quorum: time its collectives too
            self.detector.comm = comm
            comm.observers.append(self.detector.record)
        self.comm = comm
        return comm

    def _scale(self) -> float:
        m = self.membership
        return 0.0 if m.healed else self.comm.size / m.contributors

    def _failed(self, kind: str, reason: str) -> None:
        self.failed_syncs += 1
        self.on_event(
            {
                "event": "sync_discarded",
                "kind": kind,
                "local_step": self.local_step,
                "reason": reason,
            }
        )

    def _synced(self, committed: bool) -> None:
        """Time one synchronisation (quorum to commit); a new quorum becomes an event."""
        seconds = time.perf_counter() - self._t_sync
        self.last_sync_s = seconds
        if self._new_quorum:
            self.on_event(
                {
                    "event": "quorum",
                    "participants": self.comm.size,
                    "contributors": self.membership.contributors,
                    "sync_s": seconds,
                    "committed": committed,
                }
            )

    def _after_commit(self, step: int) -> None:
        """Parity of the shared state, and now and then the slow-rank exchange (both collectives
        over the quorum, at the same point on every participant)."""
        # The cadence must be the same on every participant, a newcomer included: use the
        # committed-step counter (identical after a commit), never a count kept by this process.
        n = self.membership.step
        try:
            if self.parity_every > 0 and n % self.parity_every == 0:
                shared = shared_state_of(self)
                # This rank's own digest, before any repair: what the tests compare across ranks.
                self.shared_digest = f"{state_digest(shared.shared_state()):016x}"
                report = check_parity(self.comm, shared, step=step)
                if report.event:
                    self.parity_repairs += 1
                    self.on_event(report.event)
            if self.detect_every > 0 and n % self.detect_every == 0:
                self.detector.exchange()  # slow_rank events go to on_event
        except Exception as e:  # noqa: BLE001 - a peer lost during the check: the next quorum copes
            self.membership.report_error(e)

    def elastic_metrics(self) -> dict[str, Any]:
        m = self.membership
        return {
            "participants": self.comm.size,
            "contributors": m.contributors,
            "committed": m.step,
            "failed_syncs": self.failed_syncs,
            "quorum_s": m.quorum_seconds,
            "sync_s": self.last_sync_s,
            "shared_digest": self.shared_digest,
        }


class ElasticDDP(_Elastic, DDP):
    """DDP whose every step is a quorum, a reduction and a commit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, broadcast_init=False, **kwargs)

    def shared_state(self) -> list[torch.Tensor]:
        return [p.data for p in self.params]

    @torch.no_grad()
    def sync_gradients(self) -> None:
        self.joining = False
        comm = self._quorum()
        scale = self._scale()
        self.membership.healed = False
        try:
            flats, works = [], []
            for bucket in self.buckets:
                flat = torch.cat(
                    [
                        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                        for p in bucket
                    ]
                ).mul_(scale)
                flats.append(flat)
                works.append(comm.all_reduce(flat, op="avg", async_op=True))
            for w in works:
                w.wait()
        except Exception as e:  # noqa: BLE001 - a peer died or hung mid-reduction
            self.membership.report_error(e)
        committed = self.membership.commit()
        self._synced(committed)
        if not committed:
            for p in self.params:
                p.grad = None  # the optimizer skips parameters without gradients
            self._failed("ddp", "not committed")
            return
        for bucket, flat in zip(self.buckets, flats):
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            write_flat([p.grad for p in bucket], flat)
        self._after_commit(self.local_step + 1)

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), **self.elastic_metrics()}


class ElasticStreamingDiLoCo(_Elastic, StreamingDiLoCo):
    """Streaming DiLoCo (and DiLoCo, P = 1) with a quorum and a commit per fragment sync."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, broadcast_init=False, **kwargs)
        self._syncing: tuple[int, int] | None = None

    def step(self) -> None:
        if not self.joining:
            # The parent's schedule, except that a quorum inside _start may heal this worker and
            # move it to its source's step: finish whatever is due at the step it is now at.
            Algorithm.step(self)
            t = self.local_step
            fragment = self._fragment_due_at(t + self.tau)
            if fragment is not None:
                self._start(fragment, due=t + self.tau)
            if self._pending is not None and self._pending[1] == self.local_step:
                self._finish(self._pending[0], self.local_step)
            return
        self.joining = False  # a newcomer's first call: heal, then join the sync under way
        self._syncing = None
        self._quorum()  # raises JobStateLost if nobody could heal this worker
        fragment, due = self._syncing
        self._launch(fragment, due)
        if due == self.local_step:
            self._finish(fragment, due)

    @torch.no_grad()
    def _start(self, fragment: int, due: int) -> None:
        self._syncing = (fragment, due)
        self._quorum()
        self._launch(*self._syncing)

    @torch.no_grad()
    def _launch(self, fragment: int, due: int) -> None:
        assert self._pending is None, "two fragment reductions in flight"
        self._reducer.comm = self.comm
        scale = self._scale()
        self.membership.healed = False
        delta = self._pseudo_gradient(fragment).mul_(scale)
        sent = quantized_all_reduce_bytes(delta.numel(), self.comm.size, self.codec)
        self.peak_sync_bytes = max(self.peak_sync_bytes, sent)
        try:
            if self.tau == 0:
                result = quantized_all_reduce(self.comm, delta, self.codec, op="avg")
            else:
                result = self._reducer.submit(delta)
        except Exception as e:  # noqa: BLE001
            self.membership.report_error(e)
            result = e
        self._pending = (fragment, due, result)

    @torch.no_grad()
    def _finish(self, fragment: int, t: int) -> None:
        _, _, work = self._pending
        if not isinstance(work, Exception):
            try:
                self._result()
            except Exception as e:  # noqa: BLE001 - a peer died or hung mid-reduction
                self.membership.report_error(e)
                work = e
        committed = self.membership.commit()
        self._synced(committed and not isinstance(work, Exception))
        if isinstance(work, Exception) or not committed:
            self._pending = None
            self._syncing = None
            for g, p in zip(self.global_params[fragment], self.fragments[fragment]):
                p.copy_(g.to(p.dtype))  # drop this fragment's local steps, as torchft does
            self._failed(
                f"fragment {fragment}",
                str(work) if isinstance(work, Exception) else "not committed",
            )
            return
        super()._finish(fragment, t)
        self._syncing = None
        self._after_commit(t)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "syncing": self._syncing}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._syncing = state.get("syncing")
        if self._syncing is not None:
            self._syncing = tuple(self._syncing)

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), **self.elastic_metrics()}


class ElasticNoLoCo(_Elastic, NoLoCo):
    """NoLoCo whose groups are drawn over each round's quorum, with a dead partner tolerated.

    Every outer round asks for a quorum (a control-plane barrier through the Lighthouse, no
    data), then draws the groups over its participants exactly as NoLoCo does over a fixed world.
    A partner that dies or hangs mid-exchange does not hang its group: its transfer fails (Gloo
    reports the closed connection, or the group's timeout fires), the member averages with the
    partners that did answer (alone, if none did), and the round is reported as a
    `partner_lost` event. The error also goes to torchft, so the next quorum rebuilds the group
    without the lost worker and this worker, now behind, re-syncs from a live peer. NoLoCo's
    replicas differ by design, so there is no parity check.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, broadcast_init=False, **kwargs)

    def attach(self, *args: Any, **kwargs: Any) -> None:
        super().attach(*args, **kwargs)
        self.parity_every = 0  # replicas are meant to differ

    def step(self) -> None:
        if self.joining:  # a newcomer: heal from a live peer (at its round boundary), then exchange
            self.joining = False
            self._outer_round()
            return
        Algorithm.step(self)
        if self.local_step % self.H == 0:
            self._outer_round()

    @torch.no_grad()
    def _outer_round(self) -> None:
        self._quorum()  # may heal: then local_step is the source's, at the same round boundary
        self.membership.healed = False
        round_ = self.local_step // self.H
        groups = noloco_groups(self.comm.size, self.group_size, self.seed, round_)
        group = next(g for g in groups if self.comm.rank in g)
        theta = flat_params(self.params)
        sent = (len(group) - 1) * self.codec.payload_bytes(theta.numel())
        self.peak_sync_bytes = max(self.peak_sync_bytes, sent)
        mean, lost = self._tolerant_group_mean(theta, group, tag=round_ % 2**31)
        committed = self.membership.commit()
        self._synced(committed and not lost)
        if lost:
            self.on_event({"event": "partner_lost", "round": round_, "lost": lost, "group": group})
        self.momentum.mul_(self.beta).add_(mean - self.theta_old, alpha=self.gamma)
        self.theta_old.add_(self.momentum)
        write_flat(self.params, self.theta_old)
        self.outer_steps += 1
        self.group_history.append((round_, group))

    def _tolerant_group_mean(
        self, theta: torch.Tensor, group: list[int], tag: int
    ) -> tuple[torch.Tensor, list[int]]:
        """NoLoCo's group mean over the partners that answered; also returns those that did not."""
        payload = self.codec.encode(theta)
        me = self.comm.rank
        peers = [j for j in group if j != me]
        inbox = {j: torch.empty_like(payload) for j in peers}
        works: list[tuple[int, Any]] = []
        lost: set[int] = set()
        for j in peers:  # the posting order of NoLoCo._group_mean (deadlock-freedom)
            for op in ("send", "recv") if me < j else ("recv", "send"):
                try:
                    if op == "send":
                        works.append((j, self.comm.send(payload, dst=j, tag=tag, async_op=True)))
                    else:
                        works.append((j, self.comm.recv(inbox[j], src=j, tag=tag, async_op=True)))
                except Exception as e:  # noqa: BLE001 - the partner is already gone
                    lost.add(j)
                    self.membership.report_error(e)
        for j, w in works:
            try:
                w.wait()
            except Exception as e:  # noqa: BLE001 - died or hung mid-exchange
                lost.add(j)
                self.membership.report_error(e)
        total = torch.zeros_like(theta)
        members = [j for j in group if j not in lost]
        for j in members:  # ascending rank order, own payload decoded like the others
            total += self.codec.decode(payload if j == me else inbox[j], theta.numel())
        return total / len(members), sorted(lost)

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), **self.elastic_metrics()}


class ElasticCO2(_Elastic, CO2):
    """CO2 (one-round delay) with a quorum per round and a commit when the round's average lands.

    Round r: this worker's Delta_r is taken; round r-1's background average is waited for and
    committed (or, if it failed, discarded: round r applies no average, as CO2's first round
    does, and a `sync_discarded` event says so); then the quorum for round r (a newcomer heals
    here, taking its source's landed round r-1 average with the rest of its state, and sends
    zeros for Delta_r); then the outer step applies round r-1's average, the parity check runs
    over the quorum (nothing is in flight yet), and Delta_r goes to the background, scaled to the
    contributors. Quorums and commits alternate as torchft expects.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, broadcast_init=False, **kwargs)
        if self.delay != 1:
            raise ConfigError("--elastic supports CO2's overlapped form only (--co2-delay 1)")
        self._counter = torch.zeros(1, dtype=torch.int64)  # outer_steps, for the parity check

    def shared_state(self) -> list[torch.Tensor]:
        self._counter.fill_(self.outer_steps)
        return [self.theta_old, self.momentum, self._counter]

    def step(self) -> None:
        if self.joining:
            self.joining = False
            self._elastic_round(joining=True)
            return
        Algorithm.step(self)
        if self.local_step % self.H == 0:
            self._elastic_round()

    @torch.no_grad()
    def _elastic_round(self, joining: bool = False) -> None:
        delta = self.theta_old - flat_params(self.params)
        previous = self._pending
        if previous is not None:  # land and commit round r-1 before round r's quorum
            self._t_sync = time.perf_counter()
            result: Any = None
            try:
                result = self._reducer.result(previous[1])
            except Exception as e:  # noqa: BLE001 - a peer died or hung mid-reduction
                self.membership.report_error(e)
            committed = self.membership.commit()
            self._synced(committed and result is not None)
            if result is None or not committed:
                self._failed("co2", "round average not committed; applying none this round")
                result = None
            self._pending = None if result is None else (previous[0], result)
        self._quorum()  # may heal: theta_old, momentum, local_step and the landed average
        if self.membership.healed or joining:
            delta = torch.zeros_like(delta)
        scale = self._scale()
        self.membership.healed = False
        landed = self._pending
        round_ = self.local_step // self.H
        if landed is None:  # nothing to apply (first round, or the last one failed)
            theta_bar, g, gap = self.theta_old.clone(), torch.zeros_like(delta), None
        else:
            g = landed[1]
            gap = -self.lr * self.momentum
            theta_bar = self.theta_old - gap - g
        lam = (
            staleness_penalty(gap, g, self._sizes, self.lam)
            if self.gap_penalty and gap is not None
            else self.lam
        )
        co2_outer_step(
            self.theta_old, self.momentum, theta_bar,
            beta=self.beta, lr=self.lr, lam=lam, clip=self.clip,
        )  # fmt: skip
        write_flat(self.params, self.theta_old)
        self.outer_steps += 1
        self.applied.append((self.local_step, None if landed is None else landed[0]))
        if landed is not None:  # collectives on the quorum's group: before anything is in flight
            self._after_commit(self.local_step)
        self._reducer.comm = self.comm
        sent = quantized_all_reduce_bytes(delta.numel(), self.comm.size, self.codec)
        self.peak_sync_bytes = max(self.peak_sync_bytes, sent)
        self._pending = (round_, self._reducer.submit(delta.mul_(scale)))

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), **self.elastic_metrics()}
