"""Load a token corpus from disk and split off the held-out evaluation tokens.

Every run records `Corpus.sha256`, so two runs can only be compared when they trained on the same
bytes. Everything here is deterministic for a given input: files are always read in sorted order.

Sources accepted by `load_corpus`:

- `None` or `"stdlib"`: the running Python's standard-library source (about 30 MB of `.py`),
  present on every machine that can run lowband, so a run needs no download.
- a directory: its text files (suffixes in `TEXT_SUFFIXES`), as bytes, vocab 256.
- a single file: its bytes, vocab 256.
- a `.bin` file: pre-tokenised uint16 tokens, as written by nanoGPT's `prepare.py`.
- a directory holding only `.bin` files: those files concatenated in sorted order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import platform
import stat
import sysconfig
from dataclasses import dataclass, field

import numpy as np

from lowband.errors import ConfigError, DataError

TEXT_SUFFIXES: tuple[str, ...] = (
    ".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".html", ".tex", ".c", ".h", ".js",
)  # fmt: skip
"""File suffixes read from a directory corpus; anything else there is ignored."""

BIN_SUFFIX = ".bin"
"""Suffix of a pre-tokenised file: raw little-endian uint16 tokens, no header (nanoGPT layout)."""

# Packages installed into the interpreter are not part of the standard library, and including them
# would make the corpus (and its hash) depend on what happens to be pip-installed.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages"})

# Rounding the vocabulary up to a multiple of 64 keeps embedding/unembedding matmuls aligned
# (the same trick as nanoGPT's 50257 -> 50304).
_VOCAB_MULTIPLE = 64


# eq=False: the generated __eq__ would compare numpy arrays, whose truth value is ambiguous;
# compare `sha256` instead.
@dataclass(frozen=True, eq=False)
class Corpus:
    """A loaded token stream and what identifies it."""

    name: str
    """`"stdlib"` or the path exactly as the user gave it."""

    tokens: np.ndarray = field(repr=False)
    """1-D token ids: uint8 for byte-level text, uint16 for `.bin` (then possibly a np.memmap)."""

    vocab_size: int
    """256 for bytes; for `.bin`, max token + 1 rounded up to a multiple of 64."""

    sha256: str
    """Hex SHA-256 of `tokens.tobytes()`: the content hash recorded with every run."""

    description: str
    """One human line, e.g. "Python 3.11.7 standard library, 1,790 files, 31.5 MB"."""

    num_files: int
    """How many files were read to build `tokens`."""

    documents: tuple[tuple[str, int], ...] = field(default=(), repr=False)
    """(name, token count) of every document (file) in corpus order; the counts sum to
    len(tokens) (a text file's count includes its separator). Empty when unknown. Non-iid
    partitions (lowband.data.partition) split the corpus along these."""


def load_corpus(spec: str | os.PathLike[str] | None = None) -> Corpus:
    """Load the corpus named by `spec` (see the module docstring for what is accepted).

    Text files are concatenated in order of their relative POSIX path, each followed by one
    `b"\\n"` so that no file runs into the next. In a directory, hidden files and hidden
    directories (name starting with ".") are skipped.

    A directory that holds both `.bin` files and text files is refused rather than guessed at:
    nanoGPT data folders hold `train.bin`, `val.bin` and a `prepare.py`, and silently training on
    either half of that would be wrong. Point at one `.bin` file instead. Several `.bin` files in
    one directory are read into memory to be concatenated; a single `.bin` file stays memory-mapped.

    The string `"stdlib"` always means the standard library, even if a file of that name exists.

    Raises:
        DataError: with a one-line message when the path is missing, unreadable, empty or not
            a regular file or directory (a FIFO, socket or device: reading it could block), a
            directory holds no usable files (or mixes `.bin` and text), or a `.bin` file has an
            odd number of bytes.
    """
    if spec is None or spec == "stdlib":
        return _load_stdlib()
    name = os.fspath(spec)
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        raise DataError(f"data path {name!r} does not exist")
    _check_kind(name, path)
    if os.path.isdir(path):
        return _load_directory(name, path)
    if path.endswith(BIN_SUFFIX):
        tokens = _read_bin(path)
        return _bin_corpus(name, tokens, num_files=1, what=name)
    data = _read_bytes(path)
    if not data:
        raise DataError(f"data file {name!r} is empty")
    tokens = np.frombuffer(data, dtype=np.uint8)
    return _byte_corpus(name, tokens, num_files=1, what=name)


def split_eval(
    corpus: Corpus, eval_fraction: float = 0.01, min_eval_tokens: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Return `(train_tokens, eval_tokens)`: eval is the last max(ceil(fraction * N), min) tokens.

    Both are views of `corpus.tokens` (no copy). Holding out the tail rather than random windows
    keeps the two splits disjoint with a single boundary, which every worker computes identically.

    Raises:
        DataError: if the corpus is too small to hold the eval split and at least one train token.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    n = len(corpus.tokens)
    n_eval = max(math.ceil(eval_fraction * n), int(min_eval_tokens))
    if n_eval >= n:
        raise DataError(
            f"corpus {corpus.name!r} holds {n:,} tokens, too few to hold out {n_eval:,} for eval "
            f"and still train; use a larger corpus or fewer eval tokens"
        )
    return corpus.tokens[: n - n_eval], corpus.tokens[n - n_eval :]


# --------------------------------------------------------------------------------------------
# Sources


def _load_stdlib() -> Corpus:
    root = sysconfig.get_paths()["stdlib"]
    # os.walk with pruning, not Path.rglob: rglob would descend into site-packages before the
    # filter, which costs about a second on a well-stocked interpreter.
    files = _walk(root, suffixes=(".py",), skip_dir=lambda d: d in _STDLIB_SKIP_DIRS)
    if not files:
        raise DataError(f"no .py files found under the standard library at {root!r}")
    tokens = np.frombuffer(_concat(files), dtype=np.uint8)
    what = f"Python {platform.python_version()} standard library"
    corpus = _byte_corpus("stdlib", tokens, num_files=len(files), what=what)
    return dataclasses.replace(corpus, documents=_documents(files))


def _load_directory(name: str, path: str) -> Corpus:
    found = _walk(path, suffixes=(*TEXT_SUFFIXES, BIN_SUFFIX), skip_dir=lambda d: d[:1] == ".")
    bins = [f for f in found if f[0].endswith(BIN_SUFFIX)]
    text = [f for f in found if not f[0].endswith(BIN_SUFFIX)]
    if text and bins:
        raise DataError(
            f"directory {name!r} mixes {len(bins)} .bin token file(s) and {len(text)} text "
            f"file(s); point at one .bin file or at a directory holding only one kind"
        )
    if bins:
        arrays = [_read_bin(p) for _, p in bins]
        tokens = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        corpus = _bin_corpus(name, tokens, num_files=len(bins), what=f"directory {name}")
        docs = tuple((rel, len(a)) for (rel, _), a in zip(bins, arrays))
        return dataclasses.replace(corpus, documents=docs)
    if not text:
        raise DataError(
            f"directory {name!r} holds no usable files (looked for .bin or "
            f"{', '.join(TEXT_SUFFIXES)})"
        )
    tokens = np.frombuffer(_concat(text), dtype=np.uint8)
    corpus = _byte_corpus(name, tokens, num_files=len(text), what=f"directory {name}")
    return dataclasses.replace(corpus, documents=_documents(text))


# --------------------------------------------------------------------------------------------
# Helpers


def _walk(root: str, *, suffixes: tuple[str, ...], skip_dir) -> list[tuple[str, str]]:
    """`(relative POSIX path, absolute path)` of matching regular files, sorted by the former."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not skip_dir(d)]
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for f in filenames:
            full = os.path.join(dirpath, f)
            if f.endswith(suffixes) and not f.startswith(".") and os.path.isfile(full):
                found.append((prefix + f, full))
    found.sort()
    return found


def _check_kind(name: str, path: str) -> None:
    """DataError unless `path` is a regular file or a directory: reading a FIFO, a socket or a
    device would block forever (or never end), so they are refused before anything is opened."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kinds = [
        (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    ]  # fmt: skip
    kind = next((text for test, text in kinds if test(mode)), "not a regular file")
    raise DataError(
        f"data path {name!r} is {kind}, not a file or a directory; lowband reads corpora from "
        "files (copy the stream to a file first)"
    )


def _concat(files: list[tuple[str, str]]) -> bytes:
    parts = []
    for _, path in files:
        parts.append(_read_bytes(path))
        parts.append(b"\n")  # separator, so the last line of one file never joins the next
    return b"".join(parts)


def _documents(files: list[tuple[str, str]]) -> tuple[tuple[str, int], ...]:
    """(relative path, bytes + 1 separator) of each file, as `_concat` lays them out."""
    return tuple((rel, os.path.getsize(path) + 1) for rel, path in files)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e.strerror or e}") from None


def _read_bin(path: str) -> np.ndarray:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e.strerror or e}") from None
    if size == 0:
        raise DataError(f"token file {path!r} is empty")
    if size % 2:
        raise DataError(
            f"token file {path!r} has an odd size ({size:,} bytes); a .bin must hold raw "
            f"little-endian uint16 tokens"
        )
    try:
        return np.memmap(path, dtype="<u2", mode="r")
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e.strerror or e}") from None


def _byte_corpus(name: str, tokens: np.ndarray, *, num_files: int, what: str) -> Corpus:
    desc = f"{what}, {num_files:,} file{'s' * (num_files != 1)}, {len(tokens) / 1e6:.1f} MB"
    return Corpus(name, tokens, 256, _sha256(tokens), desc, num_files)


def _bin_corpus(name: str, tokens: np.ndarray, *, num_files: int, what: str) -> Corpus:
    vocab = -(-(int(tokens.max()) + 1) // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    desc = (
        f"uint16 tokens from {what}, {num_files:,} file{'s' * (num_files != 1)}, "
        f"{len(tokens):,} tokens, vocab {vocab:,}"
    )
    return Corpus(name, tokens, vocab, _sha256(tokens), desc, num_files)


def _sha256(tokens: np.ndarray) -> str:
    # Hash the buffer in place (equal to hashing tokens.tobytes() for a contiguous array) so a
    # memory-mapped .bin is never copied; chunked to bound the pages touched at once.
    h = hashlib.sha256()
    flat = np.ascontiguousarray(tokens).reshape(-1).view(np.uint8)
    chunk = 1 << 26
    for i in range(0, len(flat), chunk):
        h.update(flat[i : i + chunk])
    return h.hexdigest()
