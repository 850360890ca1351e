"""--partition (lowband.data.partition): iid is ShardSampler exactly; non-iid splits are
deterministic, disjoint, cover the training documents, and follow their definitions."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from lowband.algorithms.registry import check
from lowband.config import TrainConfig
from lowband.data import ShardSampler, load_corpus, split_eval
from lowband.data.partition import (
    PartitionSampler,
    PartitionSpec,
    assign_documents,
    describe,
    heldout_documents,
    make_sampler,
    source_of,
    split_heldout,
)
from lowband.errors import ConfigError, DataError

torch.set_num_threads(1)
SOURCES = {"alpha": 3, "beta": 5, "gamma": 2, "delta": 4, "eps": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for pkg, files in SOURCES.items():
        (root / pkg).mkdir()
        for j in range(files):
            (root / pkg / f"m{j}.py").write_text(f"{pkg}{j}:" + pkg[0] * (500 + 97 * j) + "\n")
    (root / "top.py").write_text("t" * 300)
    return load_corpus(str(root))


def cfg(partition, **kw):
    return types.SimpleNamespace(partition=partition, batch_size=3, seq_len=16, seed=0, **kw)


def test_documents_cover_the_tokens_and_leave_the_hash_alone(corpus):
    assert sum(n for _, n in corpus.documents) == len(corpus.tokens)
    assert len(corpus.documents) == corpus.num_files == sum(SOURCES.values()) + 1
    assert {source_of(name) for name, _ in corpus.documents} == {*SOURCES, "top.py"}
    start = 0
    for name, n in corpus.documents:  # each document's bytes are its file's, then "\n"
        text = corpus.tokens[start : start + n].tobytes()
        assert text.endswith(b"\n") and (name == "top.py" or text.startswith(name[0].encode()))
        start += n
    import hashlib

    assert corpus.sha256 == hashlib.sha256(corpus.tokens.tobytes()).hexdigest()


def test_iid_is_shard_sampler_exactly(corpus):
    train, _ = split_eval(corpus, min_eval_tokens=64)
    for rank in range(3):
        mine = make_sampler(cfg("iid"), corpus, train, shard=rank, shards=3, seed=5)
        ref = ShardSampler(train, rank=rank, world_size=3, batch_size=3, seq_len=16, seed=5)
        assert isinstance(mine, ShardSampler) and mine.shard == ref.shard
        for step in (0, 7):
            assert all(torch.equal(a, b) for a, b in zip(mine.batch(step), ref.batch(step)))


def test_by_source_gives_whole_sources_largest_first(corpus):
    train, _ = split_eval(corpus, min_eval_tokens=64)
    spec = PartitionSpec.parse("by-source")
    a = assign_documents(corpus, len(train), spec, 3, seed=0)
    assert a == assign_documents(corpus, len(train), spec, 3, seed=0)
    owners = {}
    for w, docs in enumerate(a):
        for name, start, end in docs:
            assert owners.setdefault(source_of(name), w) == w  # a source never splits
            assert 0 <= start < end <= len(train)
    names = sorted(name for docs in a for name, _, _ in docs)
    assert names == sorted(n for n, _ in corpus.documents)[: len(names)]  # all but the eval tail
    loads = [sum(e - s for _, s, e in docs) for docs in a]
    assert max(loads) - min(loads) < max(sum(e - s for _, s, e in d) for d in a)  # balanced-ish
    with pytest.raises(ConfigError, match="6 sources .* for 7 workers"):
        assign_documents(corpus, len(train), spec, 7, seed=0)


def test_dirichlet_is_seeded_and_alpha_sets_the_skew(corpus):
    train, _ = split_eval(corpus, min_eval_tokens=64)
    small, large = PartitionSpec.parse("dirichlet:0.05"), PartitionSpec.parse("dirichlet:1000")
    assert str(small) == "dirichlet:0.05" and large.alpha == 1000.0
    a = assign_documents(corpus, len(train), small, 3, seed=1)
    assert a == assign_documents(corpus, len(train), small, 3, seed=1)
    assert a != assign_documents(corpus, len(train), small, 3, seed=2)

    def spread(spec):  # mean over sources of the number of workers holding some of it
        counts = []
        for seed in range(20):
            held = {}
            for w, docs in enumerate(assign_documents(corpus, len(train), spec, 3, seed=seed)):
                for name, _, _ in docs:
                    held.setdefault(source_of(name), set()).add(w)
            counts += [len(v) for k, v in held.items() if SOURCES.get(k, 0) >= 4]
        return np.mean(counts)

    assert spread(small) < 1.3 < 2.0 < spread(large)


def test_partition_sampler_draws_only_its_own_documents(corpus):
    train, _ = split_eval(corpus, min_eval_tokens=64)
    sampler = make_sampler(cfg("by-source"), corpus, train, shard=1, shards=3, seed=0)
    assert isinstance(sampler, PartitionSampler)
    allowed = np.zeros(len(corpus.tokens), dtype=bool)
    for _, s, e in sampler.documents:
        allowed[s:e] = True
    for step in range(20):
        v = sampler.window_starts(step)[:, None] + np.arange(17)
        doc = np.searchsorted(sampler._cum, v, side="right") - 1
        index = sampler._starts[doc] + (v - sampler._cum[doc])
        assert allowed[index].all()
        x, y = sampler.batch(step)
        assert torch.equal(x, torch.from_numpy(corpus.tokens[index[:, :-1]].astype(np.int64)))
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(sampler.batch(3)[0], sampler.batch(3)[0])
    shares = []
    make_sampler(cfg("by-source"), corpus, train, shard=0, shards=3, seed=0, write=shares.append)
    d = shares[0]
    assert d["partition"] == "by-source" and len(d["workers"]) == 3
    assert np.isclose(sum(w["share"] for w in d["workers"]), 1.0)
    assert describe([[("a/x", 0, 10)], [("b/y", 10, 40)]], PartitionSpec("by-source"))["workers"][
        1
    ] == {
        "worker": 1,
        "documents": 1,
        "sources": 1,
        "tokens": 30,
        "share": 0.75,
        "top_sources": ["b"],
    }


@pytest.mark.parametrize("bad", ["", "dirichlet", "dirichlet:0", "dirichlet:-1", "random", "by"])
def test_bad_partitions_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="expected iid, by-source or dirichlet:ALPHA"):
        PartitionSpec.parse(bad)
    with pytest.raises(ConfigError, match="--partition"):
        check(TrainConfig(partition=bad))


def test_refusals(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("x" * 5000)
    c = load_corpus(str(one))
    train, _ = split_eval(c, min_eval_tokens=64)
    with pytest.raises(ConfigError, match="splits the corpus by documents"):
        make_sampler(cfg("by-source"), c, train, shard=0, shards=2, seed=0)
    with pytest.raises(ConfigError, match="does not combine with --stragglers"):
        check(TrainConfig(partition="by-source", stragglers=1))
    check(TrainConfig(partition="dirichlet:0.3", algo="scaffold"))  # accepted


def test_fingerprint_of_iid_runs_is_unchanged_and_other_partitions_differ():
    import hashlib
    import json

    from lowband.train.rundir import _ADDED_LATER, _OBSERVATION_FIELDS, fingerprint

    cfg = TrainConfig()
    d = {k: v for k, v in cfg.to_dict().items() if k not in _OBSERVATION_FIELDS}
    assert "partition" in _ADDED_LATER
    for k in _ADDED_LATER:  # a run from before these fields existed
        d.pop(k, None)
    d["corpus_sha256"] = "abc"
    before = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint(cfg, "abc") == before
    assert fingerprint(TrainConfig(partition="by-source"), "abc") != before
    # a non-iid run from before the global held-out split (its eval was the tail) does not resume
    d["partition"] = "by-source"
    old = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint(TrainConfig(partition="by-source"), "abc") != old


# -- the global held-out split ----------------------------------------------------------------------


@pytest.mark.parametrize("partition", ["by-source", "dirichlet:0.3"])
def test_heldout_is_global_source_balanced_and_in_no_workers_share(corpus, partition):
    train, held_tokens = split_heldout(corpus, partition)
    held = heldout_documents(corpus)
    names = {name for name, _, _ in held}
    # the same documents whatever the partition and seed: every run is measured on the same data
    assert np.array_equal(held_tokens, split_heldout(corpus, "by-source")[1])
    assert np.array_equal(held_tokens, np.concatenate([corpus.tokens[s:e] for _, s, e in held]))
    assert len(held_tokens) >= len(split_eval(corpus)[1])  # as many tokens as the iid tail
    # one document per source in turn: every source with two documents or more gives one
    many = {k for k, v in SOURCES.items() if v >= 2}
    assert {source_of(n) for n in names} == many
    counts = [sum(source_of(n) == k for n in names) for k in many]
    assert max(counts) - min(counts) <= 1
    for seed in (0, 1):
        shares, trained = [], set()
        for rank in range(3):
            run = types.SimpleNamespace(partition=partition, batch_size=3, seq_len=16, seed=seed)
            sampler = make_sampler(run, corpus, train, shard=rank, shards=3, seed=seed,
                                   write=shares.append)  # fmt: skip
            mine = {name for name, _, _ in sampler.documents}
            assert not mine & names  # no held-out document in any worker's training share
            trained |= mine
        assert trained | names == {n for n, _ in corpus.documents}  # nothing else is lost
        for k in many:  # every source keeps a document for training
            assert any(source_of(n) == k for n in trained)
        assert shares[0]["heldout"] == {
            "documents": len(held),
            "sources": len(many),
            "tokens": len(held_tokens),
        }


def test_iid_keeps_the_tail_and_tiny_corpora_are_refused(corpus, tmp_path):
    for a, b in zip(split_heldout(corpus, "iid", 64), split_eval(corpus, min_eval_tokens=64)):
        assert a is not None and np.array_equal(a, b)
    for name in ("a.py", "b.py", "c.py"):  # three sources of one document each
        (tmp_path / name).write_text(name * 2000)
    with pytest.raises(DataError, match="cannot give .* held-out tokens and keep a document"):
        split_heldout(load_corpus(str(tmp_path)), "by-source")
