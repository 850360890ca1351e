"""D-PSGD over a graph: K local steps, then a gossip average with the neighbours, point to point.

The rule of docs/decentralized.md, shared with DFedSAM and DFedSAM-MGS (lowband/algorithms/
dfedsam.py: the same class with `sam_rho` and `gossip_steps`). Worker i, every K = sync_every
inner steps (one round):
  1. K local steps of the user's optimizer; with rho > 0 (DFedSAM) each one's gradient is taken
     at the SAM point x_i + rho * g / ||g||_2 on the same batch (`sync_gradients`).
  2. Q gossip steps (Q = gossip_steps, 1 for D-PSGD): x_i <- sum_j W[i, j] x_j, W the mixing
     matrix of --topology over the round's members (lowband.decentral.topology), summed in a
     fixed order (self, then in-neighbours ascending) so runs are bit-reproducible.
This is the adapt-then-combine form of D-PSGD (Lian et al. 2017 take the gradient at x_i while
averaging); `dpsgd_round_reference` is the rule in matrix form, the tests' reference.

Transport. Each gossip step, x_i goes once to each out-neighbour and x_j comes once from each
in-neighbour (`Comm.send`/`recv`, tag = round * Q + q). With --bits 32 the parameters travel in
their own dtype, exactly; otherwise through the codec (fp32 in, like NoLoCo). Bytes sent to each
neighbour are counted per edge (`bytes_to`), and add up to the Comm's "send" bytes.

Deadlock-freedom, step by step:
  1. Every member builds the same graph from the same spec, seed and round size, so for every
     send i -> j there is exactly one recv j <- i with the same tag and size.
  2. Each member posts all its receives and sends asynchronously and only then waits: no member
     waits before every operation of its own is posted, so no cycle of "i waits for j to post".
  3. For a transport that runs operations strictly in posting order (NCCL p2p on one stream):
     neighbours are taken in ascending order and, per pair, the lower rank sends first while the
     higher receives first; every member then meets its pairs in the global lexicographic order
     of (min, max), and the first unfinished pair has both ends at it with matching operations,
     so it completes, and by induction all do.
  4. Gossip step q + 1 is posted only after every wait of step q: tags never cross.
  5. A member talks only to its neighbours. A dead or stalled neighbour makes the wait raise the
     process group's timeout (a RuntimeError), never hang: a static group re-raises it (the run
     fails, as a collective's would); an elastic one has it reported and the neighbour's weight
     moves to the receiver's own model (W[i, i] += W[i, j]), and the next round's graph is built
     over the next quorum.
The only collective is the one-time digest check of `ensure_same_start` at construction.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from lowband.algorithms.base import Algorithm, ensure_same_start
from lowband.algorithms.registry import OptionError, check_bits
from lowband.comm import Comm, get_codec
from lowband.comm.sync import SyncGroup
from lowband.decentral.topology import Topology, check_spec, parse_topology
from lowband.errors import ConfigError

__all__ = ["DPSGD", "DPSGDOptions", "dpsgd_round_reference"]


@torch.no_grad()
def dpsgd_round_reference(X: torch.Tensor, W: torch.Tensor, Q: int = 1) -> torch.Tensor:
    """The gossip of one round in matrix form: rows of X are the workers' models after their
    local steps; returns W^Q X (the test reference)."""
    for _ in range(Q):
        X = W @ X
    return X


@dataclasses.dataclass(kw_only=True)
class DPSGDOptions:
    """Options of --algo dpsgd."""

    sync_every: int = 1
    """Local steps per round (K): the gossip runs after every K inner steps."""
    topology: str = "ring"
    """The graph: ring, torus, exponential, complete, erdos:P or a FILE.json (docs/decentralized.md); Metropolis weights unless the file gives them."""
    bits: int = 32
    """Bits per parameter value on the wire: 32 (exact, the parameters' own dtype), 16, 8 or 4."""

    def __post_init__(self) -> None:
        if self.sync_every < 1:
            raise OptionError(f"{{sync_every}} must be at least 1, got {self.sync_every}")
        check_bits(self.bits)
        try:
            check_spec(self.topology)
        except ConfigError as e:
            raise OptionError(str(e).replace("--topology", "{topology}")) from None


class _RecordingSampler:
    """The loop's sampler, remembering the last batches by step: SAM recomputes the gradient of
    the step's own batch at the perturbed point."""

    def __init__(self, sampler: Any, algo: DPSGD) -> None:
        self.sampler, self.algo = sampler, algo

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        out = tuple(self.sampler.batch(step))
        self.algo._batches[step] = out
        for old in [s for s in self.algo._batches if s < step - 2]:
            del self.algo._batches[old]
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


class DPSGD(Algorithm):
    """D-PSGD (and, with options, DFedSAM / DFedSAM-MGS) over a graph. See the module docstring.

    `closure`: for SAM (rho > 0) in your own loop, a callable returning the loss of the current
    step's batch at the current parameters; `lowband train` sets it up through `wrap_sampler`.
    """

    name = "dpsgd"
    Options = DPSGDOptions

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        group: Comm | SyncGroup,
        *,
        block_size: int = 64,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(model, optimizer, group)
        self.options = opts = self.Options(**options)
        self.K, self.spec, self.seed = opts.sync_every, opts.topology, seed
        self.Q: int = getattr(opts, "gossip_steps", 1)
        self.rho: float = getattr(opts, "sam_rho", 0.0)
        self.exact = get_codec(opts.bits).bits == 32  # the parameters' own dtype on the wire
        self.codec = get_codec(opts.bits, block_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        ensure_same_start(self.comm, [[p.data for p in self.params]])
        self.rounds = 0
        self.bytes_to: dict[int, int] = {}
        """Bytes this worker sent to each neighbour (by its fixed index), the per-edge count."""
        self.link_s_to: dict[int, float] = {}
        """The emulated link's time for those messages, per neighbour (--link or --link-map: the
        pair's link; latency + bytes / bandwidth each, no jitter); this process's only (not
        checkpointed)."""
        self.closure: Any = None
        self._batches: dict[int, tuple[torch.Tensor, ...]] = {}
        self._graphs: dict[int, Topology] = {}
        self._announced = False

    @classmethod
    def from_options(cls, model, optimizer, group, options, setup) -> DPSGD:
        return cls(model, optimizer, group, seed=setup.seed, **dataclasses.asdict(options))

    @classmethod
    def check_run(cls, cfg: Any, options: Any) -> None:
        """Before any worker starts: the graph over --workers is connected, its W doubly
        stochastic (ConfigError, one line, otherwise)."""
        parse_topology(options.topology, cfg.workers, cfg.seed)

    def topology(self, n: int) -> Topology:
        """The graph over n members (every round of a static run has the same n)."""
        if n not in self._graphs:
            self._graphs[n] = parse_topology(self.spec, n, self.seed)
        return self._graphs[n]

    # -- the local step (SAM when rho > 0) ------------------------------------------------------
    def wrap_sampler(self, sampler: Any) -> Any:
        return _RecordingSampler(super().wrap_sampler(sampler), self)

    def _step_loss(self) -> torch.Tensor:
        if self.closure is not None:
            return self.closure()
        batch = self._batches.get(self.local_step + 1)
        if batch is None:
            raise RuntimeError(
                f"{type(self).__name__} with sam_rho > 0 needs the step's batch: draw batches "
                "through algo.wrap_sampler(sampler), or set algo.closure to a function returning "
                "the step's loss"
            )
        device = self.params[0].device
        x, y = (t.to(device).long() for t in batch[:2])
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda"
            else contextlib.nullcontext()
        )
        with autocast:
            return self.model.loss(x, y)

    def sync_gradients(self) -> None:
        """SAM (Foret et al. 2021): replace the gradient g at x by the gradient at x + rho g/||g||
        on the same batch. Nothing to do for rho = 0 (D-PSGD)."""
        if self.rho == 0.0 or self.joining:
            return
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            return  # nothing was computed this step
        norm = torch.linalg.vector_norm(torch.stack([g.detach().norm() for g in grads]))
        if float(norm) == 0.0:
            return
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.add_(g, alpha=self.rho / float(norm))
                p.grad = None
        with torch.enable_grad():
            self._step_loss().backward()
        with torch.no_grad():
            for p, s in zip(self.params, saved):
                p.copy_(s)

    def step(self) -> None:
        if self.joining:  # a newcomer: heal at its peers' round boundary, then gossip
            self.join()
            return
        super().step()
        if self.local_step % self.K == 0:
            self._sync_round(self.local_step // self.K)

    # -- the gossip -----------------------------------------------------------------------------
    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    @torch.no_grad()
    def _write(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.exact else self.codec.encode(x.float())

    def _decode(self, payload: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return payload if self.exact else self.codec.decode(payload, like.numel()).to(like.dtype)

    def _gossip(self, x: torch.Tensor, topo: Topology, tag: int) -> tuple[torch.Tensor, set[int]]:
        """One gossip step: sum_j W[i, j] x_j over this worker's row; also the in-neighbours that
        did not answer (their weight goes to this worker's own model)."""
        me, members = self.comm.rank, self.sync.members
        ins, outs = topo.in_neighbours(me), topo.out_neighbours(me)
        payload = self._encode(x)
        inbox = {j: torch.empty_like(payload) for j in ins}
        works: list[tuple[int, Any]] = []
        lost: set[int] = set()
        # Post everything, then wait (module docstring, steps 2-3).
        for j in sorted(set(ins) | set(outs)):
            ops = ("send", "recv") if me < j else ("recv", "send")
            for op in ops:
                if (op == "send" and j not in outs) or (op == "recv" and j not in ins):
                    continue
                try:
                    if op == "send":
                        works.append((j, self.comm.send(payload, dst=j, tag=tag, async_op=True)))
                        seat = members[j]
                        nbytes = payload.numel() * payload.element_size()
                        self.bytes_to[seat] = self.bytes_to.get(seat, 0) + nbytes
                        link = self._link(j)
                        if link is not None:
                            self.link_s_to[seat] = self.link_s_to.get(seat, 0.0) + link.ideal_time(
                                nbytes, 1
                            )
                    else:
                        works.append((j, self.comm.recv(inbox[j], src=j, tag=tag, async_op=True)))
                except Exception as e:  # noqa: BLE001 - the neighbour is already gone
                    lost.add(j)
                    self.sync.report(e)
        for j, w in works:
            try:
                w.wait()
            except Exception as e:  # noqa: BLE001 - died or hung mid-exchange
                lost.add(j)
                self.sync.report(e)
        row = topo.W[me]
        self_weight = float(row[me]) + sum(float(row[j]) for j in ins if j in lost)
        out = x * self_weight
        for j in ins:  # fixed order: self, then in-neighbours ascending
            if j not in lost:
                out += self._decode(inbox[j], x) * float(row[j])
        return out, lost & set(ins)

    @torch.no_grad()
    def _continue_round(self, round_: int) -> None:
        round_ = self.local_step // self.K  # a heal moves this worker to its source's round
        topo = self.topology(self.comm.size)
        if not self._announced:
            self._announced = True
            if self.comm.rank == 0:
                info = topo.describe()
                if topo.n > 64:
                    info.pop("mixing")
                self.sync.event({"event": "topology", **info})
        x, lost = self._flat(), set()
        for q in range(self.Q):
            x, gone = self._gossip(x, topo, tag=(round_ * self.Q + q) % 2**31)
            lost |= gone
        # Replicas differ by design: a round whose exchange partly failed is still applied (with
        # the lost neighbours' weight on this worker's own model); commit advances the counter.
        self.sync.commit()
        if lost:
            self.sync.event({"event": "neighbour_lost", "round": round_, "lost": sorted(lost)})
        self._write(x)
        self.rounds += 1

    def _link(self, j: int):
        """The emulated link to group rank j: its pair's under --link-map, else --link's."""
        comm = self.comm
        if getattr(comm, "link_map", None) is None:
            return getattr(comm, "link", None)
        return comm.link_map.between(comm.global_ranks[comm.rank], comm.global_ranks[j])

    # -- life cycle, metrics, state -------------------------------------------------------------
    def close(self) -> None:
        if self.bytes_to:
            event = {
                "event": "edge_bytes",
                "sent_to": {str(j): b for j, b in self.bytes_to.items()},
            }
            if self.link_s_to:
                event["link_s_to"] = {str(j): s for j, s in self.link_s_to.items()}
            self.sync.event(event)

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "gossip_round": self.rounds}

    def _seat(self) -> int:
        return self.sync.members[self.comm.rank]

    def state_dict(self) -> dict[str, Any]:
        # The gossip is synchronous at the step boundary: nothing is ever in flight here.
        return {
            **super().state_dict(),
            "rounds": self.rounds,
            "bytes_to": {"owner": self._seat(), "sent": dict(self.bytes_to)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rounds = int(state["rounds"])
        # Per-edge counts are this worker's own: a resume loads them, a heal (a peer's state)
        # keeps the healed worker's.
        if state["bytes_to"]["owner"] == self._seat():
            self.bytes_to = {int(k): int(v) for k, v in state["bytes_to"]["sent"].items()}
