"""Several requests at once (`--requests N`): their prompts, arrival times, routing and figures.

Used by the modes that serve a stream of requests: pp with micro-batches (lowband.serve.pp),
splitwise pools and the colocated baseline (lowband.serve.splitwise). docs/inference.md,
sections 3 and 5.

- Request i's prompt is `--prompt` repeated 1 + (i mod 3) times, then `#i`: different tokens and
  lengths from 1x to 3x the prompt, so prefill work varies as in a real stream. With one request
  the prompt is `--prompt` itself.
- Request i samples with its own generator seeded `--seed + i`.
- Arrivals: all at t = 0, or a Poisson process of `--arrival-rate` requests per second (gaps drawn
  from an exponential with a generator seeded by `--seed`), the same on every worker.
- Routing is computed identically on every worker from the request list, so no worker has to
  ask: a request goes to the worker of its pool with the least work assigned so far (prompt
  tokens for prefill workers, tokens to decode for decode workers; ties to the lowest rank).
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import torch

from lowband.comm import Comm
from lowband.comm.accounting import CommStats
from lowband.serve.config import GenerateConfig
from lowband.serve.engine import encode


@dataclasses.dataclass
class Request:
    id: int
    prompt: list[int]
    arrival_s: float
    """Seconds after the common start at which the request arrives."""
    seed: int


def request_prompt(prompt: str, i: int, n: int) -> str:
    return prompt if n == 1 else prompt * (1 + i % 3) + f"#{i}"


def make_requests(cfg: GenerateConfig) -> list[Request]:
    n = cfg.requests
    arrivals = [0.0] * n
    if cfg.arrival_rate > 0:
        g = torch.Generator().manual_seed(cfg.seed)
        gaps = torch.empty(n, dtype=torch.float64).exponential_(cfg.arrival_rate, generator=g)
        arrivals = [0.0, *torch.cumsum(gaps[:-1], 0).tolist()]
    return [
        Request(i, encode(request_prompt(cfg.prompt, i, n)), arrivals[i], cfg.seed + i)
        for i in range(n)
    ]


def least_loaded(work: list[int], pool: list[int]) -> int:
    """Index into `pool` of the worker with the least work (ties: the first)."""
    return min(range(len(pool)), key=lambda j: (work[j], j))


def route(requests: list[Request], pool: list[int], cost) -> dict[int, int]:
    """request id -> worker of `pool`, each to the least-loaded by `cost(request)` so far."""
    work = [0] * len(pool)
    out = {}
    for r in requests:
        j = least_loaded(work, pool)
        work[j] += cost(r)
        out[r.id] = pool[j]
    return out


def record(req: Request, t0: float, stamps: list[float], tokens: list[int], **extra) -> dict:
    """One request's figures: TTFT from its arrival, its gaps between tokens."""
    return {
        "id": req.id,
        "prompt_tokens": len(req.prompt),
        "tokens": tokens,
        "arrival_s": req.arrival_s,
        "ttft_s": stamps[0] - t0 - req.arrival_s,
        "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "end_s": stamps[-1] - t0,
        **extra,
    }


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def summarize(records: list[dict]) -> dict[str, Any]:
    """All requests' figures: per request, and TTFT / TBT over all of them, and throughput."""
    records = sorted(records, key=lambda r: r["id"])
    ttft = [r["ttft_s"] for r in records]
    gaps = [g for r in records for g in r["gaps_s"]]
    total = max(r["end_s"] for r in records)
    n_tokens = sum(len(r["tokens"]) for r in records)
    return {
        "tokens": [r["tokens"] for r in records],
        "requests": records,
        "ttft_s": sum(ttft) / len(ttft),
        "ttft_p50_s": quantile(ttft, 0.5),
        "ttft_p90_s": quantile(ttft, 0.9),
        "tbt_mean_s": sum(gaps) / len(gaps) if gaps else None,
        "tbt_p50_s": quantile(gaps, 0.5),
        "tbt_p90_s": quantile(gaps, 0.9),
        "tbt_max_s": max(gaps) if gaps else None,
        "total_s": total,
        "tokens_per_s": n_tokens / total if total > 0 else None,
    }


def gather_records(comm: Comm, records: list[dict]) -> list[dict] | None:
    """Every worker's records, on worker 0 (None elsewhere). Collecting the figures is not part
    of serving (a deployed decode worker streams to its own clients), so it goes over an
    unemulated Comm with its own counters: the bytes reported are the serving's only."""
    if comm.size == 1:
        return records
    side = Comm(comm.group, None, stats=CommStats())
    blob = torch.frombuffer(bytearray(pickle.dumps(records)), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(comm.size)]
    side.all_gather(sizes, torch.tensor([blob.numel()]))
    n = int(max(s.item() for s in sizes))
    padded = torch.zeros(n, dtype=torch.uint8)
    padded[: blob.numel()] = blob
    every = [torch.empty(n, dtype=torch.uint8) for _ in range(comm.size)]
    side.all_gather(every, padded)
    if comm.rank != 0:
        return None
    return [
        r for t, s in zip(every, sizes) for r in pickle.loads(t[: int(s.item())].numpy().tobytes())
    ]


def start_together(comm: Comm, model) -> None:
    """Before the clock starts: one throwaway forward of one token (first-call overheads stay
    out of the figures) and a barrier over an unemulated side channel, so every worker's start
    time is the same instant to within the barrier's loopback exit (well under a millisecond)."""
    if hasattr(model, "forward_cached"):
        device = next(model.parameters()).device
        with torch.no_grad():
            model.forward_cached(
                torch.zeros(1, 1, dtype=torch.int64, device=device), model.new_cache(1, 1)
            )
    if comm.size > 1:
        Comm(comm.group, None, stats=CommStats()).barrier()
