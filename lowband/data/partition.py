"""Heterogeneous splits of the training tokens across workers: `--partition` (docs/federated.md).

    iid              ShardSampler's contiguous equal shards: the behaviour before --partition.
    by-source        whole top-level sources (a document's first path component: a stdlib
                     package) per worker, largest first onto the least-loaded worker.
    dirichlet:ALPHA  per source, p ~ Dir(ALPHA 1_N); each of its documents goes to worker j with
                     probability p_j.

Held out for evaluation (`split_heldout`): under iid the corpus's tail, as before; under by-source
and dirichlet a global, source-balanced set of documents (`heldout_documents`), taken out before
the split, so every worker is measured on the same mixed data and no held-out document is in any
worker's training share (the tail of a sorted corpus would be its alphabetically last sources).

Every split is a pure function of (corpus documents, held-out set, workers, seed): each worker
computes all of them alike, nothing travels. A worker's documents are concatenated in corpus order
and `PartitionSampler` draws windows from that stream as a pure function of (seed, world_size,
rank, step), like ShardSampler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lowband.data.corpus import Corpus, split_eval
from lowband.data.sampler import ShardSampler
from lowband.errors import ConfigError, DataError


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed --partition: kind "iid", "by-source" or "dirichlet" (with alpha)."""

    kind: str
    alpha: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> PartitionSpec:
        text = spec.strip().lower()
        if text in ("iid", "by-source"):
            return cls(text)
        m = re.fullmatch(r"dirichlet:(\d+(?:\.\d*)?(?:e-?\d+)?|\.\d+)", text)
        if m and 0.0 < float(m.group(1)) < float("inf"):
            return cls("dirichlet", float(m.group(1)))
        raise ConfigError(
            f"--partition {spec!r}: expected iid, by-source or dirichlet:ALPHA with ALPHA > 0 "
            "(e.g. dirichlet:0.5)"
        )

    def __str__(self) -> str:
        return f"dirichlet:{self.alpha:g}" if self.kind == "dirichlet" else self.kind


def source_of(document: str) -> str:
    """A document's source: its first path component (a top-level file is its own source)."""
    return document.split("/", 1)[0]


def _train_documents(
    corpus: Corpus, train_len: int, exclude: frozenset[str] = frozenset()
) -> list[tuple[str, int, int]]:
    """(name, start, end) of every document cut at the train boundary (empty ones and those in
    `exclude` dropped)."""
    docs, offset = [], 0
    if sum(n for _, n in corpus.documents) != len(corpus.tokens):
        raise DataError(f"corpus {corpus.name!r}: its document lengths do not cover its tokens")
    for name, n in corpus.documents:
        start, end = offset, min(offset + n, train_len)
        if end > start and name not in exclude:
            docs.append((name, start, end))
        offset += n
    return docs


HELDOUT_SEED = 0x4E1D
"""The held-out documents depend on the corpus alone (not on --seed or the partition), so every
non-iid run on a corpus is evaluated on the same documents."""


def heldout_documents(corpus: Corpus, min_eval_tokens: int = 4096) -> list[tuple[str, int, int]]:
    """The documents held out for evaluation under a non-iid partition, in corpus order.

    As many tokens as the iid tail (`split_eval`'s size), spread over the sources: sources with
    at least two documents, in a seeded order, give one seeded document each in turn (round robin)
    until the tokens suffice. A source always keeps a document for training, and its documents
    larger than a quarter of the budget come after its smaller ones (so several documents mix).
    """
    _need_documents(corpus, "a global held-out split")
    n_eval = len(split_eval(corpus, min_eval_tokens=min_eval_tokens)[1])
    docs = _train_documents(corpus, len(corpus.tokens))
    sources: dict[str, list[int]] = {}
    for i, (name, _, _) in enumerate(docs):
        sources.setdefault(source_of(name), []).append(i)
    rng = np.random.default_rng([HELDOUT_SEED])
    cap = n_eval / 4  # larger documents come last in their source's turn: several documents mix
    names = [s for s in sorted(sources) if len(sources[s]) >= 2]
    queues = {}
    for s in (names[k] for k in rng.permutation(len(names))):
        order = sorted(rng.permutation(sources[s]), key=lambda i: docs[i][2] - docs[i][1] > cap)
        queues[s] = order[: len(sources[s]) - 1]  # at least one document stays for training
    held, total = [], 0
    while total < n_eval and any(queues.values()):
        for q in queues.values():
            if q and total < n_eval:
                i = q.pop(0)
                held.append(i)
                total += docs[i][2] - docs[i][1]
    if total < n_eval:
        raise DataError(
            f"corpus {corpus.name!r}: its sources cannot give {n_eval:,} held-out tokens and keep "
            f"a document each for training (got {total:,}); use a larger corpus or --partition iid"
        )
    return [docs[i] for i in sorted(held)]


def split_heldout(
    corpus: Corpus, partition: str = "iid", min_eval_tokens: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """(train_tokens, eval_tokens) under --partition. iid: `split_eval` (the tail, unchanged).
    by-source, dirichlet: eval is `heldout_documents` concatenated in corpus order, the same for
    every worker and every seed; train is the whole corpus, whose held-out documents
    `assign_documents` (through `make_sampler`) leaves out of every worker's share."""
    if PartitionSpec.parse(partition).kind == "iid":
        return split_eval(corpus, min_eval_tokens=min_eval_tokens)
    held = heldout_documents(corpus, min_eval_tokens)
    return corpus.tokens, np.concatenate([corpus.tokens[s:e] for _, s, e in held])


def _need_documents(corpus: Corpus, what: str) -> None:
    if len(corpus.documents) < 2:
        raise ConfigError(
            f"--partition {what} splits the corpus by documents, and corpus {corpus.name!r} has "
            f"{len(corpus.documents)}; use a directory of files (or stdlib), or --partition iid"
        )


def assign_documents(
    corpus: Corpus,
    train_len: int,
    spec: PartitionSpec,
    workers: int,
    seed: int,
    exclude: frozenset[str] = frozenset(),
) -> list[list[tuple[str, int, int]]]:
    """Per worker, its (name, start, end) documents in corpus order: those before `train_len`
    and not in `exclude` (the held-out documents' names)."""
    _need_documents(corpus, str(spec))
    docs = _train_documents(corpus, train_len, exclude)
    sources: dict[str, list[int]] = {}
    for i, (name, _, _) in enumerate(docs):
        sources.setdefault(source_of(name), []).append(i)
    names = sorted(sources)
    owner = np.zeros(len(docs), dtype=np.int64)
    if spec.kind == "by-source":
        if len(names) < workers:
            raise ConfigError(
                f"--partition by-source: corpus {corpus.name!r} has {len(names)} sources "
                f"(top-level folders or files) for {workers} workers"
            )
        size = {s: sum(docs[i][2] - docs[i][1] for i in sources[s]) for s in names}
        tie = np.random.default_rng([seed, 1]).permutation(len(names))
        order = sorted(range(len(names)), key=lambda k: (-size[names[k]], tie[k]))
        load = [0] * workers
        for k in order:  # largest first onto the least-loaded worker (lowest index on ties)
            w = min(range(workers), key=lambda j: (load[j], j))
            load[w] += size[names[k]]
            owner[sources[names[k]]] = w
    else:
        rng = np.random.default_rng([seed, 2])
        for s in names:
            p = rng.dirichlet(np.full(workers, spec.alpha))
            owner[sources[s]] = rng.choice(workers, size=len(sources[s]), p=p)
    return [[docs[i] for i in np.flatnonzero(owner == w)] for w in range(workers)]


class PartitionSampler:
    """Worker `rank`'s windows from the concatenation of its documents (module docstring)."""

    def __init__(
        self,
        tokens: np.ndarray,
        documents: list[tuple[str, int, int]],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seq_len: int,
        seed: int,
    ) -> None:
        self.tokens, self.documents = tokens, documents
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        starts = np.array([s for _, s, _ in documents], dtype=np.int64)
        lengths = np.array([e - s for _, s, e in documents], dtype=np.int64)
        self._starts = starts
        self._cum = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self._cum[-1])
        if self.num_tokens < seq_len + 1:
            raise DataError(
                f"--partition gives worker {rank} {self.num_tokens:,} tokens, need at least "
                f"{seq_len + 1:,} for seq_len {seq_len}; use fewer workers or another partition"
            )

    def window_starts(self, step: int) -> np.ndarray:
        """The B int64 positions, in this worker's stream, where the windows of `batch(step)` begin."""
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng([self.seed, self.world_size, self.rank, step])
        return rng.integers(0, self.num_tokens - self.seq_len, size=self.batch_size)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x_BL, y_BL)` int64 for training step `step`."""
        v = self.window_starts(step)[:, None] + np.arange(self.seq_len + 1, dtype=np.int64)
        doc = np.searchsorted(self._cum, v, side="right") - 1
        index = self._starts[doc] + (v - self._cum[doc])
        return _windows(self.tokens, index)

    def __repr__(self) -> str:
        return (
            f"PartitionSampler(rank={self.rank}, world_size={self.world_size}, "
            f"documents={len(self.documents)}, tokens={self.num_tokens})"
        )


def _windows(tokens: np.ndarray, index_BL1: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    w_BL1 = torch.from_numpy(tokens[index_BL1].astype(np.int64))
    return w_BL1[:, :-1].contiguous(), w_BL1[:, 1:].contiguous()


def describe(
    assignment: list[list[tuple[str, int, int]]],
    spec: PartitionSpec,
    top: int = 3,
    heldout: list[tuple[str, int, int]] | None = None,
) -> dict[str, Any]:
    """Each worker's share (and the held-out documents'), for partition.json and the report."""
    total = sum(e - s for docs in assignment for _, s, e in docs) or 1
    workers = []
    for w, docs in enumerate(assignment):
        by_source: dict[str, int] = {}
        for name, s, e in docs:
            by_source[source_of(name)] = by_source.get(source_of(name), 0) + e - s
        n = sum(by_source.values())
        workers.append(
            {
                "worker": w,
                "documents": len(docs),
                "sources": len(by_source),
                "tokens": n,
                "share": n / total,
                "top_sources": sorted(by_source, key=lambda k: (-by_source[k], k))[:top],
            }
        )
    out: dict[str, Any] = {"partition": str(spec), "workers": workers}
    if heldout is not None:
        out["heldout"] = {
            "documents": len(heldout),
            "sources": len({source_of(name) for name, _, _ in heldout}),
            "tokens": sum(e - s for _, s, e in heldout),
        }
    return out


def make_sampler(
    cfg: Any,
    corpus: Corpus,
    train_tokens: np.ndarray,
    *,
    shard: int,
    shards: int,
    seed: int,
    write: Any = None,
) -> ShardSampler | PartitionSampler:
    """The training sampler of worker `shard` of `shards` under cfg.partition.

    `iid` is ShardSampler exactly as before; the others split by documents, less the global
    held-out ones (`split_heldout`; `train_tokens` is then unused). `write`, if given, is called
    with the partition's description (rank 0 writes partition.json with it).
    """
    spec = PartitionSpec.parse(getattr(cfg, "partition", "iid"))
    if spec.kind == "iid":
        return ShardSampler(
            train_tokens,
            rank=shard,
            world_size=shards,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            seed=seed,
        )
    held = heldout_documents(corpus)
    names = frozenset(name for name, _, _ in held)
    assignment = assign_documents(corpus, len(corpus.tokens), spec, shards, cfg.seed, names)
    if write is not None:
        write(describe(assignment, spec, heldout=held))
    return PartitionSampler(
        corpus.tokens,
        assignment[shard],
        rank=shard,
        world_size=shards,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=seed,
    )


__all__ = [
    "PartitionSampler",
    "PartitionSpec",
    "assign_documents",
    "describe",
    "heldout_documents",
    "make_sampler",
    "source_of",
    "split_heldout",
]
