"""The run folder: what a run leaves on disk, and the rules that keep it from being overwritten.

runs/NAME/
  config.json          the resolved TrainConfig
  meta.json            versions, machine, corpus hash, git commit, parameter count
  metrics/rankR.jsonl  one JSON line per logged step and worker
  ckpt/step_SSSSSSS/   rankR.pt plus rankR.json (its sha256); complete when every rank's .json is there
  summary.json         final figures, written by rank 0 at the end
  summaries/rankR.json elastic jobs: each worker's totals, merged into summary.json at the end

Every JSON file lowband reads back from a run folder goes through `read_json`: a file that cannot
be read, is not valid JSON, or does not hold what lowband writes there is one RunFileError that
names it, and nothing on disk is changed (no metrics truncated, no checkpoint pruned).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowband.config import TrainConfig
from lowband.errors import CheckpointError, ConfigError, RunDirError, RunFileError

# Fields that change how a run is observed but not what it computes: a resume may differ in them.
_ADDED_LATER = {"inner_optimizer": "adamw", "partition": "iid", "link_map": None}
"""Fields added after runs were made, with the value those runs used: left out of the fingerprint
at that value."""
_OBSERVATION_FIELDS = {
    "eval_every",
    "eval_batches",
    "log_every",
    "ckpt_every",
    "keep_checkpoints",
    "fail_at",
    "threads",
    "compile",  # how the same step is computed, not what it computes
    "activation_checkpointing",
}


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# -- reading a run folder's JSON -----------------------------------------------------------------
# A shape maps a field to what it must hold: int, float (an int will do), str, bool, dict, list,
# None (JSON null), a tuple of these (any one of them), ListOf(item, length) or DictOf(value).
NUMBER = (int, float)


@dataclass(frozen=True)
class ListOf:
    item: Any
    length: int | None = None


@dataclass(frozen=True)
class DictOf:
    value: Any


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          dict: "an object", list: "a list", None: "null"}  # fmt: skip


def _matches(value: Any, spec: Any) -> bool:
    if isinstance(spec, tuple):
        return any(_matches(value, s) for s in spec)
    if isinstance(spec, ListOf):
        return (
            isinstance(value, list)
            and (spec.length is None or len(value) == spec.length)
            and all(_matches(v, spec.item) for v in value)
        )
    if isinstance(spec, DictOf):
        return isinstance(value, dict) and all(_matches(v, spec.value) for v in value.values())
    if spec is None:
        return value is None
    if spec in (int, float) and isinstance(value, bool):
        return False  # JSON true is not a number
    if spec is float:
        return isinstance(value, int | float)
    return isinstance(value, spec)


def _describe(spec: Any) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    if isinstance(spec, ListOf):
        count = f"{spec.length} " if spec.length is not None else ""
        return f"a list of {count}({_describe(spec.item)})"
    if isinstance(spec, DictOf):
        return f"an object of ({_describe(spec.value)})"
    return _NAMES[spec]


def _found(value: Any) -> str:
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "an object", list: "a list", type(None): "null"}[type(value)]  # fmt: skip
    text = json.dumps(value)
    short = value is not None and not isinstance(value, dict | list) and len(text) <= 40
    return f"{kind} ({text})" if short else kind


def check_fields(
    path: Path | str,
    data: Mapping[str, Any],
    required: Mapping[str, Any],
    optional: Mapping[str, Any],
) -> None:
    """RunFileError naming `path` unless every `required` field is present and every field of
    `required` or `optional` that is present holds what its spec says."""
    for name, spec in {**optional, **required}.items():
        if name not in data:
            if name in required:
                raise RunFileError(f"{path} is corrupt: it has no {name!r} field")
            continue
        if not _matches(data[name], spec):
            raise RunFileError(
                f"{path} is corrupt: {name!r} should be {_describe(spec)}, "
                f"found {_found(data[name])}"
            )


def read_json(
    path: Path,
    required: Mapping[str, Any] | None = None,
    optional: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object in `path`, its fields checked (`check_fields`). Raises RunFileError, naming
    the file, when it cannot be read, is not UTF-8 JSON or not an object, or a field is missing
    or of the wrong type. Reads only."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise RunFileError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise RunFileError(f"{path} is corrupt: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = (
            "it is empty" if not text.strip() else f"{e.msg} at line {e.lineno} column {e.colno}"
        )
        raise RunFileError(f"{path} is corrupt: not valid JSON ({where})") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path} is corrupt: it should hold a JSON object, found {_found(data)}")
    check_fields(path, data, required or {}, optional or {})
    return data


def _annotation_spec(annotation: str) -> Any:
    """The spec of a config field from its annotation ("int", "float | None", "dict"...)."""
    names = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "None": None}
    specs = tuple(names[part.strip()] for part in str(annotation).split("|"))
    return specs[0] if len(specs) == 1 else specs


def config_shape(cls: type) -> dict[str, Any]:
    """Field -> spec of a config dataclass (TrainConfig, FinetuneConfig), from its annotations."""
    import dataclasses

    return {f.name: _annotation_spec(f.type) for f in dataclasses.fields(cls)}


def read_config(path: Path, cls: type | None = None) -> dict[str, Any]:
    """config.json as a dict whose fields (and algorithm options) have the types `cls` declares
    (default: FinetuneConfig for a finetune run, else TrainConfig)."""
    data = read_json(path)
    check_config(path, data, cls)
    return data


def check_config(path: Path, data: dict[str, Any], cls: type | None = None) -> None:
    """RunFileError unless the fields of a config dict have the types `cls` declares."""
    from lowband.config import FinetuneConfig

    if cls is None:
        cls = FinetuneConfig if data.get("algo") == "zo" else TrainConfig
    check_fields(path, data, {}, config_shape(cls))
    if cls is TrainConfig:
        from lowband.algorithms.registry import discover, option_fields

        discover()
        options = {k: _annotation_spec(owners[0][1].type) for k, owners in option_fields().items()}
        check_fields(path, data.get("options") or {}, {}, options)
        # a run saved before the algorithms declared their options kept them at the top level
        check_fields(path, {k: v for k, v in data.items() if v is not None}, {}, options)


SUMMARY = {
    "final_eval_loss": (float, None), "final_train_loss": (float, None), "steps": int,
    "tokens": NUMBER, "wall_time": NUMBER, "tokens_per_s": NUMBER,
    "bytes_sent_per_worker": NUMBER, "bytes_sent_total": NUMBER, "bytes_recv_total": NUMBER,
    "compute_time_per_worker": NUMBER, "comm_time_per_worker": NUMBER,
    "compute_utilisation": NUMBER, "bytes_by_op": DictOf(NUMBER), "world_size": int,
}  # fmt: skip
"""The fields of summary.json (lowband.train.loop.summary_from_rows), each optional."""
META = {"corpus": (dict, None), "model_params": NUMBER, "world_size": int}
"""The fields of meta.json that are read back (the report), each optional."""
WORKER_SUMMARY = {
    "row": ListOf(NUMBER, 5),
    "by_op": DictOf(dict),
    "eval_loss": (float, None),
    "train_loss": (float, None),
}
"""The shape of an elastic worker's summaries/rankR.json (lowband.train.session.ElasticSession):
row = [bytes sent, bytes received, compute s, comm s, wall s]; by_op = {op: {"bytes_sent": ...}}."""
CORPUS = {"name": str, "sha256": str, "num_tokens": NUMBER, "description": str}
"""The fields of meta.json's "corpus", each optional."""


SIDECAR = {"step": int, "rank": int, "world_size": int, "fingerprint": str, "sha256": str}
"""The shape of a checkpoint's rankR.json (lowband.train.checkpoint.save)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(cfg: TrainConfig, corpus_sha256: str) -> str:
    """What a checkpoint must agree with to be resumed: the config (less observation fields) and the data."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _OBSERVATION_FIELDS}
    for k, default in _ADDED_LATER.items():  # runs from before a field existed still match
        if d.get(k) == default:
            d.pop(k)
    if d.get("partition", "iid") != "iid":  # held out across sources since #15, not the tail
        d["heldout"] = "global"
    d["corpus_sha256"] = corpus_sha256
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    world_size: int
    fingerprint: str


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    meta_path = property(lambda self: self.path / "meta.json")
    metrics_dir = property(lambda self: self.path / "metrics")
    ckpt_dir = property(lambda self: self.path / "ckpt")
    summary_path = property(lambda self: self.path / "summary.json")

    def metrics_path(self, rank: int) -> Path:
        return self.metrics_dir / f"rank{rank}.jsonl"

    # -- creating and reopening -----------------------------------------------------------------
    def check_new(self) -> None:
        """Refuse an out folder that already holds something: nothing on disk is ever overwritten."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise RunDirError(f"--out {self.path} exists and is not a folder")
        if self.config_path.exists():
            raise RunDirError(
                f"{self.path} already holds a run; continue it with --resume {self.path}, or choose another --out"
            )
        if any(self.path.iterdir()):
            raise RunDirError(
                f"{self.path} is not empty and not a lowband run; choose another --out"
            )

    def create(self, cfg: TrainConfig) -> None:
        self.check_new()
        try:
            self.metrics_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)
            write_json_atomic(self.config_path, cfg.to_dict())
        except OSError as e:  # read-only, below a file, no space: one line, not a traceback
            raise RunDirError(
                f"cannot create the run folder {self.path}: {e.strerror or e}"
            ) from None

    def load_config(self) -> TrainConfig:
        """The run's TrainConfig, for --resume: one line if config.json is missing, corrupt,
        mistyped or a finetune run's."""
        data = self._saved_config(finetune=False)
        try:
            return TrainConfig.from_dict(data)
        except TypeError as e:  # e.g. an "options" that is not an object
            raise RunFileError(f"{self.config_path} is corrupt: {e}") from None

    def load_finetune_config(self):
        """The run's FinetuneConfig, for `lowband finetune --resume`."""
        from lowband.config import FinetuneConfig

        return FinetuneConfig.from_dict(self._saved_config(finetune=True))

    def _saved_config(self, finetune: bool) -> dict[str, Any]:
        if not self.config_path.exists():
            raise RunDirError(f"--resume {self.path}: not a lowband run folder (no config.json)")
        data = read_json(self.config_path)
        if finetune and data.get("algo") != "zo":
            raise ConfigError(f"--resume {self.path} is not a finetune run; use lowband train")
        if not finetune and data.get("algo") == "zo":
            raise ConfigError(f"--resume {self.path} is a finetune run; use lowband finetune")
        check_config(self.config_path, data)
        return data

    # -- checkpoints ----------------------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.ckpt_dir / f"step_{step:07d}"

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first (complete: every rank wrote its sidecar). A sidecar
        that is corrupt (not one a crash could leave: they are written atomically) is a
        RunFileError naming it."""
        return self._scan(strict=True)

    def _scan(self, strict: bool) -> list[Checkpoint]:
        found: list[Checkpoint] = []
        if not self.ckpt_dir.is_dir():
            return found
        for d in sorted(self.ckpt_dir.iterdir()):
            m = re.fullmatch(r"step_(\d+)", d.name)
            if not m or not (d / "rank0.json").exists():
                continue
            try:
                head = read_json(d / "rank0.json", SIDECAR)
            except RunFileError as e:
                if not strict:
                    continue
                raise RunFileError(
                    f"{e}; remove {d} to resume from the checkpoint before it"
                ) from None
            world = head["world_size"]
            if world < 1 and strict:
                raise RunFileError(f"{d / 'rank0.json'} is corrupt: world_size {world} < 1")
            if world > 0 and all((d / f"rank{r}.json").exists() for r in range(world)):
                found.append(Checkpoint(int(m.group(1)), d, world, head["fingerprint"]))
        return found

    def verify_checkpoint(
        self, ckpt: Checkpoint, expected_fingerprint: str, world_size: int
    ) -> None:
        """Raise a LowbandError unless every rank's file is intact and belongs to this run and to
        this checkpoint, and the metrics a resume truncates are readable; read-only, so a resume
        refused here has changed nothing."""
        if ckpt.fingerprint != expected_fingerprint:
            raise CheckpointError(
                f"checkpoint {ckpt.path} belongs to a different run (fingerprint {ckpt.fingerprint} != {expected_fingerprint})"
            )
        if ckpt.world_size != world_size:
            raise CheckpointError(
                f"checkpoint {ckpt.path} was written by {ckpt.world_size} workers, this run has {world_size}"
            )
        for r, side in enumerate(self._check_rank_files(ckpt)):
            f = ckpt.path / f"rank{r}.pt"
            if not f.exists() or sha256_file(f) != side["sha256"]:
                raise CheckpointError(
                    f"checkpoint file {f} is missing or corrupt (sha256 mismatch)"
                )
        self.check_readable()

    def _check_rank_files(self, ckpt: Checkpoint) -> list[dict[str, Any]]:
        """Every rank's sidecar, each proven to be of this checkpoint: the same run (fingerprint),
        step and world size as rank0.json, its own rank, and no rank file beyond the world size.
        Files mixed in from another run, step or world size are refused."""
        expected = {
            "step": ckpt.step,
            "world_size": ckpt.world_size,
            "fingerprint": ckpt.fingerprint,
        }
        sides = []
        for r in range(ckpt.world_size):
            side_path = ckpt.path / f"rank{r}.json"
            side = read_json(side_path, SIDECAR)
            for key, want in {**expected, "rank": r}.items():
                if side[key] != want:
                    raise CheckpointError(
                        f"checkpoint {ckpt.path} mixes files of different runs, steps or world "
                        f"sizes: {side_path.name} has {key} {side[key]!r}, expected {want!r}; "
                        "restore them, or remove the folder to resume from the checkpoint before it"
                    )
            sides.append(side)
        for f in sorted(ckpt.path.iterdir()):
            m = re.fullmatch(r"rank(\d+)\.(json|pt)", f.name)
            if m and int(m.group(1)) >= ckpt.world_size:
                raise CheckpointError(
                    f"checkpoint {ckpt.path} mixes files of different world sizes: {f.name} is "
                    f"beyond the {ckpt.world_size} worker(s) that wrote it"
                )
        return sides

    def prune_checkpoints(self, keep: int) -> None:
        complete = self._scan(strict=False)  # an unreadable folder is left alone
        if keep < 1 or len(complete) <= keep:
            return
        newest_kept = complete[-keep].step
        for d in self.ckpt_dir.iterdir():
            m = re.fullmatch(r"step_(\d+)", d.name)
            if m and int(m.group(1)) < newest_kept:
                shutil.rmtree(d, ignore_errors=True)

    # -- metrics --------------------------------------------------------------------------------
    def metrics_lines(self, path: Path) -> list[tuple[str, int | None]]:
        """(line, its step) for each line of a metrics file; the step is None for a last line cut
        short by a crash. Any other line that is not an object with an integer "step" is a
        RunFileError naming the file and line."""
        try:
            raw = path.read_bytes().decode("utf-8", errors="replace").splitlines()
        except OSError as e:
            raise RunFileError(f"cannot read {path}: {e.strerror or e}") from None
        out: list[tuple[str, int | None]] = []
        for n, line in enumerate(raw, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = record.get("step") if isinstance(record, dict) else None
                if not isinstance(step, int) or isinstance(step, bool):
                    raise ValueError('not an object with an integer "step"')
            except ValueError as e:
                if n == len(raw):  # a line cut short by a crash
                    out.append((line, None))
                    continue
                raise RunFileError(f"{path}:{n} is corrupt: {e}") from None
            out.append((line, step))
        return out

    def check_readable(self) -> None:
        """RunFileError unless every metrics/rankR.jsonl (metrics_lines) and, in an elastic job,
        every summaries/rankR.json (worker_summaries) can be read back: a resume checks them all
        before it changes anything."""
        if self.metrics_dir.is_dir():
            for path in sorted(self.metrics_dir.glob("rank*.jsonl")):
                self.metrics_lines(path)
        self.worker_summaries()

    def worker_summaries(self) -> list[dict[str, Any]]:
        """Every summaries/rank*.json (elastic), by name, each checked (WORKER_SUMMARY)."""
        parts = []
        for path in sorted((self.path / "summaries").glob("rank*.json")):
            part = read_json(path, WORKER_SUMMARY)
            for op in part["by_op"].values():
                check_fields(path, op, {"bytes_sent": NUMBER}, {})
            parts.append(part)
        return parts

    def truncate_metrics(self, rank: int, after_step: int) -> None:
        """Drop lines past a checkpoint: the resumed run recomputes those steps. A last line cut
        short by a crash goes too; a corrupt line elsewhere is refused before anything changes."""
        path = self.metrics_path(rank)
        if not path.exists():
            return
        if after_step == 0:  # no checkpoint: the run starts again, and every line goes
            path.write_text("")
            return
        keep = [
            line
            for line, step in self.metrics_lines(path)
            if step is not None and step <= after_step
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def default_run_name(cfg: TrainConfig) -> str:
    return f"runs/{cfg.algo}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
