"""Corpus loading, eval split, per-worker sharding and eval batches (lowband.data)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from lowband.data import Corpus, ShardSampler, eval_batches, load_corpus, split_eval
from lowband.errors import DataError


@pytest.fixture(scope="module")
def stdlib() -> Corpus:
    return load_corpus()


def _bytes_corpus(n: int, seed: int = 0) -> Corpus:
    tokens = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)
    return Corpus("synthetic", tokens, 256, "-", "synthetic", 1)


# --------------------------------------------------------------------------------------------
# Corpus


def test_stdlib_corpus_is_large_deterministic_and_fast(stdlib: Corpus):
    assert stdlib.name == "stdlib"
    assert stdlib.vocab_size == 256 and stdlib.tokens.dtype == np.uint8
    assert stdlib.tokens.ndim == 1 and len(stdlib.tokens) > 5_000_000
    assert stdlib.num_files > 100 and "standard library" in stdlib.description
    t0 = time.perf_counter()
    again = load_corpus("stdlib")
    elapsed = time.perf_counter() - t0
    assert again.sha256 == stdlib.sha256 and len(again.sha256) == 64
    assert np.array_equal(again.tokens, stdlib.tokens)
    assert elapsed < 5.0  # budget is ~1.5 s; generous here so a loaded CI box does not flake
    # site-packages must not leak in: pytest's own source is installed there.
    assert b"def pytest_addoption" not in stdlib.tokens.tobytes()


def test_directory_corpus(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"bbb")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.py").write_bytes(b"aa")
    (tmp_path / "a.md").write_bytes(b"m")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")  # not a text suffix: ignored
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_bytes(b"hidden")  # hidden directory: skipped
    c = load_corpus(str(tmp_path))
    # Sorted by relative POSIX path: a.md, b.txt, sub/a.py; each followed by b"\n".
    assert c.tokens.tobytes() == b"m\nbbb\naa\n"
    assert c.vocab_size == 256 and c.tokens.dtype == np.uint8 and c.num_files == 3
    assert c.name == str(tmp_path)
    before = c.sha256
    (tmp_path / "b.txt").write_bytes(b"bbc")
    assert load_corpus(str(tmp_path)).sha256 != before


def test_single_text_file(tmp_path):
    f = tmp_path / "notes.log"  # any suffix works for a single file
    f.write_bytes(b"hello world")
    c = load_corpus(str(f))
    assert c.tokens.tobytes() == b"hello world" and c.vocab_size == 256 and c.num_files == 1
    before = c.sha256
    f.write_bytes(b"hello World")
    assert load_corpus(f).sha256 != before


def test_bin_file_and_bin_directory(tmp_path):
    a = np.array([1, 2, 3, 50256], dtype="<u2")
    b = np.array([7, 8], dtype="<u2")
    a.tofile(tmp_path / "a.bin")
    c = load_corpus(str(tmp_path / "a.bin"))
    assert isinstance(c.tokens, np.memmap) and c.tokens.dtype == np.uint16
    assert c.tokens.tolist() == a.tolist()
    assert c.vocab_size == 50304  # 50257 rounded up to a multiple of 64
    assert c.sha256 != load_corpus(_write(tmp_path / "c.bin", b)).sha256
    (tmp_path / "c.bin").unlink()
    b.tofile(tmp_path / "b.bin")
    d = load_corpus(str(tmp_path))
    assert d.tokens.tolist() == a.tolist() + b.tolist() and d.num_files == 2
    small = load_corpus(_write(tmp_path / "s" / "x.bin", np.array([0, 63], dtype="<u2")))
    assert small.vocab_size == 64


def _write(path, arr: np.ndarray) -> str:
    path.parent.mkdir(exist_ok=True)
    arr.tofile(path)
    return str(path)


def _bad_path(tmp_path, case: str) -> str:
    """Build the on-disk situation for one error case and return the path to load."""
    files = {"empty-text": b"", "empty-bin": b"", "odd-bin": b"abc", "dir-unusable": b"abc"}
    names = {
        "empty-text": "e.txt",
        "empty-bin": "e.bin",
        "odd-bin": "o.bin",
        "dir-unusable": "x.png",
    }
    if case in files:
        (tmp_path / names[case]).write_bytes(files[case])
    if case == "missing":
        return str(tmp_path / "missing.txt")
    if case.startswith("dir-"):
        return str(tmp_path)
    return str(tmp_path / names[case])


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("empty-text", "is empty"),
        ("empty-bin", "is empty"),
        ("odd-bin", "odd size"),
        ("dir-unusable", "no usable files"),
        ("dir-empty", "no usable files"),
    ],
)
def test_load_errors(tmp_path, case, message):
    with pytest.raises(DataError, match=message) as err:
        load_corpus(_bad_path(tmp_path, case))
    assert "\n" not in str(err.value)


def test_directory_mixing_bin_and_text_is_refused(tmp_path):
    np.arange(4, dtype="<u2").tofile(tmp_path / "train.bin")
    (tmp_path / "prepare.py").write_bytes(b"print()")
    with pytest.raises(DataError, match="mixes 1 .bin"):
        load_corpus(str(tmp_path))


# --------------------------------------------------------------------------------------------
# Eval split


def test_split_eval_is_tail_views_and_disjoint():
    c = _bytes_corpus(100_000)
    train, ev = split_eval(c, eval_fraction=0.1, min_eval_tokens=16)
    assert len(ev) == 10_000 and len(train) == 90_000
    assert np.shares_memory(train, c.tokens) and np.shares_memory(ev, c.tokens)
    assert not np.shares_memory(train, ev)
    assert np.array_equal(np.concatenate([train, ev]), c.tokens)
    _, ev = split_eval(c, eval_fraction=0.001, min_eval_tokens=4096)
    assert len(ev) == 4096  # the minimum wins over a tiny fraction


def test_split_eval_too_small():
    with pytest.raises(DataError, match="too few to hold out 4,096"):
        split_eval(_bytes_corpus(4000))


# --------------------------------------------------------------------------------------------
# ShardSampler


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_disjoint_and_cover(world_size):
    n = 10_003
    tokens = np.arange(n, dtype=np.uint16)
    shard_len = n // world_size
    samplers = [
        ShardSampler(tokens, rank=r, world_size=world_size, batch_size=8, seq_len=16, seed=3)
        for r in range(world_size)
    ]
    assert [s.shard for s in samplers] == [
        (r * shard_len, (r + 1) * shard_len) for r in range(world_size)
    ]
    for s in samplers:
        start, end = s.shard
        for step in range(20):
            starts = s.window_starts(step)
            assert starts.shape == (8,)
            assert (starts >= start).all() and (starts + 17 <= end).all()
            # tokens == their index here, so the batch itself names where it came from.
            x, y = s.batch(step)
            assert x.dtype == torch.int64 and x.shape == (8, 16) == y.shape
            assert torch.equal(x[:, 0], torch.from_numpy(starts))
            assert int(x.min()) >= start and int(y.max()) < end
            assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)


def test_batch_is_pure_function_of_seed_rank_step():
    tokens = _bytes_corpus(50_000).tokens
    kw = dict(world_size=4, batch_size=4, seq_len=32, seed=11)
    a = ShardSampler(tokens, rank=2, **kw)
    b = ShardSampler(tokens, rank=2, **kw)
    later = [b.batch(s) for s in (9, 3, 7)]  # order of calls must not matter
    for (xb, yb), step in zip(later, (9, 3, 7)):
        xa, ya = a.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not np.array_equal(a.window_starts(3), a.window_starts(4))
    # Other ranks live in other shards; compare offsets inside the shard to be sure seeds differ.
    other = ShardSampler(tokens, rank=1, **kw)
    assert not np.array_equal(
        a.window_starts(3) - a.shard[0], other.window_starts(3) - other.shard[0]
    )
    reseeded = ShardSampler(tokens, rank=2, **{**kw, "seed": 12})
    assert not np.array_equal(a.window_starts(3), reseeded.window_starts(3))


def test_shard_too_small_message():
    tokens = np.zeros(403, dtype=np.uint8)
    ShardSampler(tokens, rank=3, world_size=4, batch_size=2, seq_len=99, seed=0)  # 100 fits
    with pytest.raises(DataError, match=r"shard of rank 3 holds 100 tokens, need at least 129"):
        ShardSampler(tokens, rank=3, world_size=4, batch_size=2, seq_len=128, seed=0)


def test_sampler_reads_memmapped_bin(tmp_path):
    np.arange(3000, dtype="<u2").tofile(tmp_path / "t.bin")
    c = load_corpus(str(tmp_path / "t.bin"))
    x, y = ShardSampler(c.tokens, rank=1, world_size=2, batch_size=2, seq_len=8, seed=0).batch(0)
    assert x.dtype == torch.int64 and int(x.min()) >= 1500 and torch.equal(y, x + 1)


# --------------------------------------------------------------------------------------------
# Eval batches


def test_eval_batches_deterministic_non_overlapping_inside_split():
    c = Corpus("idx", np.arange(60_000, dtype=np.uint16), 60_032, "-", "-", 1)
    train, ev = split_eval(c, eval_fraction=0.1)
    batches = eval_batches(ev, batch_size=4, seq_len=63, num_batches=5)
    again = eval_batches(ev, batch_size=4, seq_len=63, num_batches=5)
    assert len(batches) == 5
    for (x, y), (x2, y2) in zip(batches, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.shape == (4, 63) and torch.equal(y, x + 1)
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts[0] == int(ev[0]) and starts[-1] + 64 == int(ev[-1]) + 1  # spread end to end
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))  # windows never overlap
    assert min(starts) >= len(train)  # never touches the train split


def test_eval_batches_clamped_and_too_small():
    ev = np.arange(1000, dtype=np.uint16)
    # 1000 // 65 = 15 windows -> 3 batches of 4 fit.
    assert len(eval_batches(ev, batch_size=4, seq_len=64, num_batches=100)) == 3
    with pytest.raises(DataError, match="need at least 1,040"):
        eval_batches(ev, batch_size=16, seq_len=64, num_batches=1)
