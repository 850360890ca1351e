"""Prefill and decode on different workers (Splitwise), under a stream of requests; and the
colocated baseline it is measured against.

docs/inference.md, section 5. Workers [0, D) decode, [D, W) prefill (P = --prefill-workers,
D = W - P). Every worker computes the same routing from the request list
(lowband.serve.requests): a request goes to the prefill worker with the fewest prompt tokens
assigned so far and to the decode worker with the fewest tokens to decode.

Prefill worker p, for its requests in order of arrival:
    1. waits for the request to arrive; runs its prompt layer by layer; as soon as layer i's keys
       and values exist it sends them (one message, 2 x 1 x K x L x D) to the request's decode
       worker without waiting, while layer i + 1 computes (Splitwise's layer-wise transfer);
    2. after the last layer samples the first token and sends it (and, when sampling, its
       generator's state, 5,056 bytes, so the decode worker draws what one process would), then
       goes on to its next request while the sends are under way.
Decode worker d:
    3. one receiving thread per prefill worker takes that worker's requests for d in the order it
       sends them (layers 0 .. N-1, token, state) into a fresh KV cache and hands the request
       over; the first token's arrival is the request's TTFT;
    4. the decode loop: before every step it admits the requests handed over; a step decodes one
       token for each admitted request (B = 1 each: each request's logits are one process's, bit
       for bit); a request leaves when it has its tokens.
Colocated (--parallel colocated): worker w serves the requests routed to it (fewest prompt + new
tokens so far); its decode loop admits a request by prefilling it itself once it has arrived
(prefill first, so a long prompt delays the others' next tokens: the interference Splitwise
removes). It sends nothing.
No deadlock: sends are asynchronous; a receiving thread's only peer is one prefill worker, which
sends in the order the thread receives and waits for nothing but its own sends.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from torch import Tensor

from lowband.comm import Comm
from lowband.errors import ConfigError
from lowband.models.llama import KVCache, Transformer, rotary_tables
from lowband.serve.requests import Request, record, route
from lowband.serve.sampling import Sampler

OnToken = Callable[[int, int], None] | None  # (request id, token)


def check_splitwise(workers: int, prefill_workers: int = 1) -> None:
    if not 1 <= prefill_workers < workers:
        raise ConfigError(
            f"--parallel splitwise needs a prefill pool and a decode pool: --prefill-workers "
            f"{prefill_workers} of --workers {workers} leaves "
            f"{workers - prefill_workers} to decode (at least 1 each)"
        )


def pools(workers: int, prefill_workers: int) -> tuple[list[int], list[int]]:
    """(decode workers, prefill workers)."""
    return list(range(workers - prefill_workers)), list(range(workers - prefill_workers, workers))


def splitwise_routes(
    requests: list[Request], workers: int, prefill_workers: int, max_new_tokens: int
) -> tuple[dict[int, int], dict[int, int]]:
    """request id -> prefill worker, request id -> decode worker."""
    decode, prefill = pools(workers, prefill_workers)
    return (
        route(requests, prefill, lambda r: len(r.prompt)),
        route(requests, decode, lambda r: max_new_tokens),
    )


@dataclasses.dataclass
class Active:
    """A request being decoded: its cache, sampler, last token and what it has produced."""

    req: Request
    cache: KVCache
    sampler: Sampler
    token_B: Tensor
    tokens: list[int]
    stamps: list[float]


def decode_requests(
    model: Transformer,
    admit: Callable[[bool], list[Active]],
    n_mine: int,
    max_new_tokens: int,
    t0: float,
    on_token: OnToken = None,
    **extra,
) -> list[dict]:
    """Step 4 (and the colocated loop): `admit(block)` returns the requests ready to join (with
    their first token); with block=True it waits for at least one. Returns their records."""
    active: list[Active] = []
    records: list[dict] = []
    while len(records) < n_mine:
        for a in admit(not active):
            if on_token is not None:
                on_token(a.req.id, a.tokens[0])
            active.append(a)
        for a in active:
            if len(a.tokens) < max_new_tokens:
                x_BL = a.token_B[:, None].to(model.tok_embeddings.weight.device)
                logits = model.forward_cached(x_BL, a.cache)
                a.token_B = a.sampler(logits[:, -1])
                a.stamps.append(time.perf_counter())
                a.tokens.append(int(a.token_B[0]))
                if on_token is not None:
                    on_token(a.req.id, a.tokens[-1])
        for a in [a for a in active if len(a.tokens) >= max_new_tokens]:
            active.remove(a)
            records.append(record(a.req, t0, a.stamps, a.tokens, **extra))
    return records


def sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


@torch.no_grad()
def prefill_requests(
    model: Transformer,
    comm: Comm,
    mine: list[Request],
    to_decode: dict[int, int],
    temperature: float,
    top_p: float,
    t0: float,
) -> None:
    """Steps 1-2 on a prefill worker."""
    c = model.cfg
    pending: deque = deque()  # (Work, tensor): sends not yet waited on, oldest first

    def send(t: Tensor, dst: int) -> None:
        pending.append((comm.send(t, dst, async_op=True), t))
        while len(pending) > 4 * (c.n_layers + 2):  # a few requests' messages in flight
            pending.popleft()[0].wait()

    for r in mine:
        sleep_until(t0 + r.arrival_s)
        d, L = to_decode[r.id], len(r.prompt)
        prompt_BL = torch.tensor([r.prompt], device=model.tok_embeddings.weight.device)
        cache = model.new_cache(1, L)
        positions_BL = torch.arange(L, device=prompt_BL.device)[None]
        cos_B1LD, sin_B1LD = rotary_tables(positions_BL, c.head_dim, c.rope_theta)
        h_BLE = model.tok_embeddings(prompt_BL)
        for i, layer in enumerate(model.layers):
            h_BLE = layer.forward_cached(h_BLE, cos_B1LD, sin_B1LD, cache, i)
            send(torch.stack([cache.k[i][:, :, :L], cache.v[i][:, :, :L]]), d)  # 1. overlapped
        sampler = Sampler(temperature, top_p, r.seed)
        send(sampler(model.output(model.norm(h_BLE))[:, -1]), d)  # 2.
        if temperature > 0:
            send(sampler.generator.get_state(), d)
    while pending:
        pending.popleft()[0].wait()


@torch.no_grad()
def receive_requests(
    model: Transformer,
    comm: Comm,
    src: int,
    theirs: list[Request],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    inbox: queue.Queue,
) -> None:
    """Step 3: one prefill worker's requests for this decode worker, in the order it sends them."""
    c = model.cfg
    try:
        for r in theirs:
            L = len(r.prompt)
            cache = model.new_cache(1, L + max_new_tokens)
            for i in range(c.n_layers):
                kv_2BKLD = torch.empty(
                    2,
                    1,
                    c.n_kv_heads,
                    L,
                    c.head_dim,
                    dtype=cache.k[i].dtype,
                    device=cache.k[i].device,
                )
                comm.recv(kv_2BKLD, src)
                cache.k[i][:, :, :L], cache.v[i][:, :, :L] = kv_2BKLD[0], kv_2BKLD[1]
            cache.length = L
            token_B = torch.empty(1, dtype=torch.int64)
            comm.recv(token_B, src)
            sampler = Sampler(temperature, top_p, r.seed)
            if temperature > 0:  # continue where the prefill worker's draw left the generator
                state = sampler.generator.get_state()
                comm.recv(state, src)
                sampler.generator.set_state(state)
            now = time.perf_counter()
            inbox.put(Active(r, cache, sampler, token_B, [int(token_B[0])], [now]))
    except BaseException as e:  # noqa: BLE001 - re-raised by the decode loop
        inbox.put(e)


def splitwise_requests(
    model: Transformer,
    comm: Comm,
    requests: list[Request],
    prefill_workers: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    on_token: OnToken = None,
) -> list[dict]:
    """This worker's part; the records of the requests it decoded (none on prefill workers)."""
    W, me = comm.size, comm.rank
    check_splitwise(W, prefill_workers)
    to_prefill, to_decode = splitwise_routes(requests, W, prefill_workers, max_new_tokens)
    decode, prefill = pools(W, prefill_workers)
    t0 = time.perf_counter()
    if me in prefill:
        mine = [r for r in requests if to_prefill[r.id] == me]
        prefill_requests(model, comm, mine, to_decode, temperature, top_p, t0)
        return []
    inbox: queue.Queue = queue.Queue()
    threads = []
    for p in prefill:
        theirs = [r for r in requests if to_prefill[r.id] == p and to_decode[r.id] == me]
        if theirs:
            args = (model, comm, p, theirs, max_new_tokens, temperature, top_p, inbox)
            threads.append(threading.Thread(target=receive_requests, args=args, daemon=True))
    for t in threads:
        t.start()

    def admit(block: bool) -> list[Active]:
        got = [inbox.get()] if block else []
        while True:
            try:
                got.append(inbox.get_nowait())
            except queue.Empty:
                break
        for g in got:
            if isinstance(g, BaseException):
                raise g
        return got

    n_mine = sum(to_decode[r.id] == me for r in requests)
    records = decode_requests(
        model, admit, n_mine, max_new_tokens, t0, on_token, decode_worker=me,
    )  # fmt: skip
    for t in threads:
        t.join()
    for r in records:
        r["prefill_worker"] = to_prefill[r["id"]]
    return records


@torch.no_grad()
def colocated_requests(
    model: Transformer,
    comm: Comm,
    requests: list[Request],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    on_token: OnToken = None,
) -> list[dict]:
    """The baseline: this worker prefills and decodes the requests routed to it."""
    to_worker = route(requests, list(range(comm.size)), lambda r: len(r.prompt) + max_new_tokens)
    mine = deque(r for r in requests if to_worker[r.id] == comm.rank)
    n_mine = len(mine)
    t0 = time.perf_counter()

    def admit(block: bool) -> list[Active]:
        if block and mine:
            sleep_until(t0 + mine[0].arrival_s)
        got = []
        while mine and mine[0].arrival_s <= time.perf_counter() - t0:
            r = mine.popleft()
            cache = model.new_cache(1, len(r.prompt) + max_new_tokens)
            sampler = Sampler(temperature, top_p, r.seed)
            prompt_BL = torch.tensor([r.prompt], device=model.tok_embeddings.weight.device)
            token_B = sampler(model.forward_cached(prompt_BL, cache)[:, -1])
            got.append(Active(r, cache, sampler, token_B, [int(token_B[0])], [time.perf_counter()]))
        return got

    return decode_requests(
        model, admit, n_mine, max_new_tokens, t0, on_token, decode_worker=comm.rank
    )
