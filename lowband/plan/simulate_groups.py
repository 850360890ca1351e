"""The simulator's rules without a collective over all workers: NoLoCo's groups and the gossip rules.

lowband.plan.simulate plays the rounds of DDP, the DiLoCo family, CO2 and the federated rules on
one clock per round (the collective waits for its last member). The rules here keep a clock per
group or per worker; GroupRun adds their round ends to the simulator's _Run (the same events,
failures, healing and counters), and `play_noloco` / `play_gossip` are their loops, which
lowband.plan.simulate.simulate picks by technique.

NoLoCo (lowband.algorithms.noloco) has no collective over all workers. Round r:
  1. the groups are `noloco_groups(len(quorum), g, seed, r)` over the quorum (the live workers, in
     rank order, plus any that failed after their last exchange and are not yet detected), the
     real algorithm's function, so the group sizes are its own (the last group takes the rest);
  2. every worker runs H inner steps on its own clock;
  3. each group's exchange starts when its last member arrives and lasts cost.group_exchange's
     seconds for the group's real size on its own link (its slowest pair: a group inside one site
     uses the intra link); its members leave at the end. Clocks are per group: a straggler delays
     only its group that round (and, through the next rounds' groups, those it meets later).
  Failures: a member that fails before its group's exchange ends loses its round; its partners
  cannot finish before the failure is detected (t_fail + --detect-s) and average among themselves
  (the real algorithm's `partner_lost`): no round is discarded and no other group waits. A worker
  that fails after its exchange is still drawn into the next round's group, which waits for the
  detection. A recovered worker downloads the state (20 bytes per parameter) from one live peer
  (same site if any) at that peer's round boundary; only the two of them stall.

Gossip rules (lowband.algorithms.dpsgd): per-worker clocks. Each round every worker runs H inner
steps (DFedSAM: two passes each), then Q gossip steps over `in_neighbours` of the live members'
graph: a step ends at the latest of a worker's and its in-neighbours' clocks plus
cost.gossip_exchange's step on its slowest neighbour's link (`GroupRun.gossip`). A failure costs the
failed worker's round and holds its neighbours until the detection, as NoLoCo's groups.
"""

from __future__ import annotations

import math

import numpy as np

from lowband.plan.simulate import _go_on, _Run, heal_bytes


class GroupRun(_Run):
    """A _Run whose round ends are per group (NoLoCo) or per worker (the gossip rules)."""

    def heal_into_groups(self) -> None:
        """NoLoCo: each recovered worker downloads the state from one live peer (same site if
        any) when that peer is at its round boundary; only the two of them stall."""
        if not self.pending or not self.ranks:
            return
        state = heal_bytes(self.w, self.t)
        for j in self.pending:
            src = self.net.heal_source(j, self.ranks)
            link = self.net.heal_link(j, [src])
            heal = link.ideal_time(state, 1) if link else 0.0
            i = self.ranks.index(src)
            done = max(float(self.clocks[i]), self.back_at.get(j, self.now)) + heal
            self.clocks[i] = done
            self.ranks.append(j)
            self.clocks = np.append(self.clocks, done)
            self.sent += state
            self.heal += heal
        self.pending = []

    def exchange(self, groups: list[list[int]], ghosts: dict[int, float]) -> int:
        """NoLoCo's round end: every group exchanges on its own clock. Returns the workers whose
        round is applied; `ghosts` (drawn into a group but failed after their last exchange) is
        replaced by this round's such workers. See the module docstring, "NoLoCo"."""
        at = {r: i for i, r in enumerate(self.ranks)}
        live = [[r for r in g if r in at] for g in groups]
        arrive = [max((float(self.clocks[at[r]]) for r in m), default=self.now) for m in live]
        hold = [max((ghosts[r] + self.f.detect_s for r in g if r in ghosts), default=-math.inf)
                for g in groups]  # fmt: skip

        def end_of(k: int) -> float:
            secs = self.net.exchange(self.w, self.t, live[k])[0] if len(live[k]) > 1 else 0.0
            return max(arrive[k] + secs, hold[k])

        ends = [end_of(k) for k in range(len(groups))]
        group_of = {r: k for k, m in enumerate(live) for r in m}
        new_ghosts: dict[int, float] = {}
        slowest = float(self.clocks.max()) if self.ranks else self.now
        for when, who in self._failures(
            lambda: max(ends, default=-math.inf), lambda r: new_ghosts.pop(r, None)
        ):
            if who in group_of:
                self.failed += 1
                k = group_of.pop(who)
                if when < ends[k]:  # before its group's exchange ended: its round is lost
                    live[k].remove(who)
                    arrive[k] = max((float(self.clocks[at[r]]) for r in live[k]), default=when)
                    hold[k] = max(hold[k], when + self.f.detect_s)
                    ends[k] = end_of(k)
                else:  # already in its next round: its next group waits for the detection
                    new_ghosts[who] = when
        survivors = [r for m in live for r in m if r in group_of]
        clocks = np.empty(len(survivors))
        i = 0
        for k, m in enumerate(live):
            if len(m) > 1:
                self.sent += self.net.exchange(self.w, self.t, m)[1] * len(m)
            kept = [r for r in m if r in group_of]
            clocks[i : i + len(kept)] = ends[k]
            i += len(kept)
        committed = sum(len(m) for m in live)
        self.ranks, self.clocks = survivors, clocks
        if self.ranks:
            self.exposed += max(0.0, float(clocks.max()) - slowest)
        ghosts.clear()
        ghosts.update(new_ghosts)
        return committed

    # -- gossip: per-worker clocks ---------------------------------------------------------------

    def gossip(self, members: list[int], ghosts: dict[int, float], seed: int) -> int:
        """A gossip round's end: Q gossip steps, each worker's ending at the latest of its own
        and its in-neighbours' clocks plus its step's seconds, so a straggler delays its
        neighbours in the first step, theirs in the second, and no one farther. A member that
        fails before its own exchange ends (or failed after its previous one, `ghosts`) loses
        its round; its neighbours wait for the detection, then go on without it (the real
        algorithm's neighbour_lost). Returns the workers whose round is applied."""
        index, secs, sent = self.net.gossip(self.w, self.t, members, seed)
        q = self.t.gossip_steps if self.t.algo == "dfedsam-mgs" else 1
        at = {r: i for i, r in enumerate(self.ranks)}
        pos = {r: i for i, r in enumerate(members)}
        start = np.array([self.clocks[at[r]] if r in at else -math.inf for r in members])
        hold = np.full(len(members), -math.inf)
        dead = np.zeros(len(members), dtype=bool)
        for r, when in ghosts.items():
            dead[pos[r]], hold[pos[r]] = True, when + self.f.detect_s

        def ends() -> np.ndarray:
            c = start
            for _ in range(q):
                c = np.where(dead, hold, c)[index].max(axis=1) + secs
            return c

        end = ends()
        slowest = float(self.clocks.max()) if self.ranks else self.now
        after: dict[int, float] = {}  # failed after their own exchange ended
        for when, who in self._failures(
            lambda: max(end[~dead], default=-math.inf), lambda r: after.pop(r, None)
        ):
            if who in at and who not in after and not dead[pos[who]]:
                self.failed += 1
                i = pos[who]
                if when < end[i]:  # before its exchange ended: its round is lost
                    dead[i], hold[i] = True, when + self.f.detect_s
                    end[:] = ends()
                else:
                    after[who] = when
        applied = [r for r in members if not dead[pos[r]]]
        self.sent += sent * len(applied)
        self.ranks = [r for r in applied if r not in after]
        self.clocks = np.array([end[pos[r]] for r in self.ranks])
        if self.ranks:
            self.exposed += max(0.0, float(self.clocks.max()) - slowest)
        ghosts.clear()
        ghosts.update(after)
        return len(applied)


def play_noloco(run: GroupRun, period, frags, tau, seed, *limits) -> tuple[int, int, int]:
    """NoLoCo (lowband.algorithms.noloco): every round, groups drawn by `noloco_groups` from
    the seed and the round over the live workers; each group exchanges on its own clock."""
    from lowband.algorithms.noloco import noloco_groups

    tokens = step = lost_in_a_row = r = 0
    ghosts: dict[int, float] = {}  # failed after their exchange: their next group waits
    while _go_on(run, tokens, step, lost_in_a_row, *limits):
        if not run.ranks:
            ghosts.clear()
        run.restart_if_all_down()
        run.heal_into_groups()
        r += 1
        quorum = sorted({*run.ranks, *ghosts})
        groups = [
            [quorum[i] for i in g] for g in noloco_groups(len(quorum), run.t.group_size, seed, r)
        ]
        run.advance(period)
        done = run.exchange(groups, ghosts)
        tokens += done * period * run.w.step_tokens
        lost_in_a_row = 0 if done else lost_in_a_row + 1
        step += period
    return tokens, step, lost_in_a_row


def play_gossip(run: GroupRun, period, frags, tau, seed, *limits) -> tuple[int, int, int]:
    """D-PSGD, DFedSAM, DFedSAM-MGS (lowband.algorithms.dpsgd): every round each worker runs H
    inner steps (DFedSAM: two passes each), then Q gossip steps with its graph neighbours over
    the round's members, on its own clock (`GroupRun.gossip`)."""
    tokens = step = lost_in_a_row = 0
    ghosts: dict[int, float] = {}  # failed after their exchange: their neighbours wait
    while _go_on(run, tokens, step, lost_in_a_row, *limits):
        if not run.ranks:
            ghosts.clear()
        run.restart_if_all_down()
        run.heal_into_groups()
        members = sorted({*run.ranks, *ghosts})
        run.advance(period)
        done = run.gossip(members, ghosts, seed)
        tokens += done * period * run.w.step_tokens
        lost_in_a_row = 0 if done else lost_in_a_row + 1
        step += period
    return tokens, step, lost_in_a_row
