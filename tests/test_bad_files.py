"""A run folder's files, corrupt or mistyped or mixed up, on `--resume`, `lowband report` and
`lowband join`: one line on stderr, exit 2, and every file exactly as it was (nothing truncated,
nothing pruned, nothing written). One real 2-worker run (6 steps, checkpoints at 4 and 6) is
copied and damaged per case; every refusal happens before any worker starts.
"""

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from lowband.cli import main
from lowband.data import load_corpus
from lowband.errors import RunFileError
from lowband.launch.admission import admission_address, parse_admission
from lowband.launch.elastic import launch_elastic
from lowband.train import checkpoint
from lowband.train.rundir import RunDir, fingerprint

torch.set_num_threads(1)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and err[0].startswith("lowband: error: "), err[0]
    return err[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while bytes cross a slow link".split()
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(12_000)))
    return path


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("runs") / "a"
    flags = ["--workers", "2", "--steps", "6", "--ckpt-every", "2", "--log-every", "1"]
    flags += ["--eval-every", "3", "--eval-batches", "1", "--batch-size", "2", "--seq-len", "32"]
    assert main(["train", *flags, "--data", str(data), "--out", str(out)]) == 0
    return out


@pytest.fixture
def stopped(done_run, tmp_path) -> Path:
    """The run as if stopped after step 6 but before its last checkpoint: a resume would load
    checkpoint 4 and truncate both workers' metrics after step 4."""
    run = tmp_path / "stopped"
    shutil.copytree(done_run, run)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "ckpt" / "step_0000006")
    return run


def _refused(argv: list[str], folder: Path, capsys, *expected: str) -> str:
    before = snapshot(folder)
    assert main(argv) == 2
    line = error_line(capsys)
    for text in expected:
        assert text in line, line
    assert snapshot(folder) == before  # nothing truncated, deleted or written
    return line


# -- config.json on --resume -------------------------------------------------------------------

CONFIG_DAMAGE = {
    "truncated": lambda t: t[: len(t) // 2],
    "empty": lambda t: "",
    "not utf-8": lambda t: b"\xff\xfe{".decode("latin-1"),
    "a list": lambda t: "[1, 2, 3]",
    "steps a string": lambda t: _edit(t, steps="many"),
    "lr a list": lambda t: _edit(t, lr=[0.1]),
    "workers a float": lambda t: _edit(t, workers=2.5),
    "elastic a string": lambda t: _edit(t, elastic="yes"),
    "options a list": lambda t: _edit(t, options=[1, 2]),
    "an option mistyped": lambda t: _edit(t, options={"bucket_mb": "big"}),
}
CONFIG_SAYS = {
    "truncated": "not valid JSON", "empty": "not valid JSON (it is empty)",
    "not utf-8": "not UTF-8", "a list": "should hold a JSON object, found a list",
    "steps a string": "'steps' should be an integer, found a string (\"many\")",
    "lr a list": "'lr' should be a number or null, found a list",
    "workers a float": "'workers' should be an integer, found a number (2.5)",
    "elastic a string": "'elastic' should be true or false",
    "options a list": "'options' should be an object", "an option mistyped": "'bucket_mb'",
}  # fmt: skip


def _edit(text: str, **fields) -> str:
    return json.dumps({**json.loads(text), **fields})


@pytest.mark.parametrize("case", list(CONFIG_DAMAGE))
def test_corrupt_or_mistyped_config_on_resume(stopped, capsys, case):
    path = stopped / "config.json"
    damaged = CONFIG_DAMAGE[case](path.read_text())
    path.write_bytes(damaged.encode("latin-1" if case == "not utf-8" else "utf-8"))
    _refused(["train", "--resume", str(stopped)], stopped, capsys, str(path), CONFIG_SAYS[case])


def test_a_finetune_run_is_not_resumed_by_train(stopped, capsys):
    path = stopped / "config.json"
    path.write_text(_edit(path.read_text(), algo="zo"))
    _refused(["train", "--resume", str(stopped)], stopped, capsys, "use lowband finetune")


# -- checkpoint sidecars and metrics on --resume -------------------------------------------------

SIDECAR_DAMAGE = {
    "truncated": (0, lambda d: json.dumps(d)[:20], "not valid JSON"),
    "a list": (0, lambda d: "[]", "should hold a JSON object"),
    "world_size a string": (0, lambda d: json.dumps({**d, "world_size": "2"}), "'world_size'"),
    "no sha256": (1, lambda d: json.dumps({k: v for k, v in d.items() if k != "sha256"}), "sha256"),
    "step a float": (1, lambda d: json.dumps({**d, "step": 4.0}), "'step' should be an integer"),
}


@pytest.mark.parametrize("case", list(SIDECAR_DAMAGE))
def test_corrupt_or_mistyped_checkpoint_sidecar_on_resume(stopped, capsys, case):
    rank, damage, says = SIDECAR_DAMAGE[case]
    path = stopped / "ckpt" / "step_0000004" / f"rank{rank}.json"
    path.write_text(damage(json.loads(path.read_text())))
    _refused(["train", "--resume", str(stopped)], stopped, capsys, str(path), says)


@pytest.mark.parametrize("line", ['{"step": 3, "train_loss": 1.0', "[1, 2]", '{"step": "3"}'])
def test_corrupt_metrics_line_on_resume(stopped, capsys, line):
    """rank 0's metrics are fine and would be truncated first; rank 1's third line is not."""
    path = stopped / "metrics" / "rank1.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = line
    path.write_text("\n".join(lines) + "\n")
    _refused(["train", "--resume", str(stopped)], stopped, capsys, f"{path}:3 is corrupt")


def test_a_line_cut_short_by_a_crash_is_still_dropped(stopped):
    """The one damage a crash leaves (the last line half-written) is not an error."""
    path = stopped / "metrics" / "rank1.jsonl"
    path.write_text(path.read_text() + '{"step": 7, "tra')
    run = RunDir(stopped)
    run.check_readable()
    run.truncate_metrics(1, 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


# -- mixed-up rank files on --resume (#20: rank 0's metrics were truncated before the refusal) ---


def _other_state(stopped: Path, step: int, rank: int, world: int, fp: str) -> None:
    """Rank files as another run (or the same run at another step or world size) writes them."""
    checkpoint.save(RunDir(stopped), step, rank, world, fp, {"model": {}, "note": "other run"})


def _fp(stopped: Path) -> str:
    return json.loads((stopped / "ckpt" / "step_0000004" / "rank0.json").read_text())["fingerprint"]


def _move_rank1(src: Path, dst: Path) -> None:
    for suffix in ("pt", "json"):
        shutil.copyfile(src / f"rank1.{suffix}", dst / f"rank1.{suffix}")


def test_rank_files_of_another_run_are_refused_before_anything_is_truncated(stopped, capsys):
    tmp = stopped.parent / "elsewhere"
    _other_state(tmp, 4, 1, 2, "0123456789abcdef")
    _move_rank1(tmp / "ckpt" / "step_0000004", stopped / "ckpt" / "step_0000004")
    _refused(
        ["train", "--resume", str(stopped)], stopped, capsys,
        "mixes files of different runs", "rank1.json has fingerprint '0123456789abcdef'",
    )  # fmt: skip


def test_rank_files_of_another_step_are_refused(done_run, stopped, capsys):
    _move_rank1(done_run / "ckpt" / "step_0000006", stopped / "ckpt" / "step_0000004")
    _refused(
        ["train", "--resume", str(stopped)], stopped, capsys, "rank1.json has step 6, expected 4"
    )


def test_rank_files_of_another_world_size_are_refused(stopped, capsys):
    fp = _fp(stopped)
    tmp = stopped.parent / "wider"
    for rank in (1, 2, 3):
        _other_state(tmp, 4, rank, 4, fp)
    _move_rank1(tmp / "ckpt" / "step_0000004", stopped / "ckpt" / "step_0000004")
    _refused(["train", "--resume", str(stopped)], stopped, capsys, "rank1.json has world_size 4")


def test_rank_files_beyond_the_world_size_are_refused(stopped, capsys):
    folder = stopped / "ckpt" / "step_0000004"
    for suffix in ("pt", "json"):
        shutil.copyfile(folder / f"rank1.{suffix}", folder / f"rank2.{suffix}")
    _refused(["train", "--resume", str(stopped)], stopped, capsys, "rank2.json is beyond the 2")


# -- lowband report ------------------------------------------------------------------------------

REPORT_DAMAGE = {
    "config truncated": ("config.json", lambda t: t[:30], "not valid JSON"),
    "config workers a list": ("config.json", lambda t: _edit(t, workers=[2]), "'workers'"),
    "meta a list": ("meta.json", lambda t: "[]", "should hold a JSON object"),
    "meta corpus a string": ("meta.json", lambda t: _edit(t, corpus="x"), "'corpus'"),
    "meta sha256 a number": (
        "meta.json", lambda t: _edit(t, corpus={"sha256": 1}), "'sha256' should be a string",
    ),
    "summary truncated": ("summary.json", lambda t: t[:-5], "not valid JSON"),
    "summary loss a string": (
        "summary.json", lambda t: _edit(t, final_eval_loss="low"), "'final_eval_loss'",
    ),
    "summary bytes_by_op mistyped": (
        "summary.json", lambda t: _edit(t, bytes_by_op={"all_reduce": "1 MB"}), "'bytes_by_op'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REPORT_DAMAGE))
def test_corrupt_or_mistyped_files_on_report(done_run, tmp_path, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    name, damage, says = REPORT_DAMAGE[case]
    (run / name).write_text(damage((run / name).read_text()))
    out = tmp_path / "report"
    _refused(["report", str(run), "--out", str(out)], run, capsys, str(run / name), says)
    assert not out.exists()


def test_mistyped_events_do_not_break_the_report(done_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    events = [
        {"event": "quorum", "step": 2, "participants": [1], "sync_s": "slow"},
        {"event": "recovered", "step": 3, "transfer_s": "fast"},
        {"event": ["not", "a", "name"], "step": 3},
    ]
    with open(run / "metrics" / "rank0.jsonl", "a") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)
    (run / "metrics" / "events.jsonl").write_bytes(b'{"event": "worker_died"}\n\xff\xfe\n')
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").exists()


# -- elastic files: summaries on --resume, elastic.json and the admission answer on join ----------


def _elastic_run(stopped: Path, data: Path) -> Path:
    """The run as an elastic job's folder: config elastic, one checkpoint of the job's state."""
    cfg_path = stopped / "config.json"
    cfg_path.write_text(_edit(cfg_path.read_text(), elastic=True))
    cfg = RunDir(stopped).load_config()
    shutil.rmtree(stopped / "ckpt")
    fp = fingerprint(cfg, load_corpus(str(data)).sha256)
    checkpoint.save(RunDir(stopped), 4, 0, 1, fp, {"model": {}, "committed": 2})
    parts = stopped / "summaries"
    parts.mkdir()
    for i in range(2):
        part = {"row": [1.0, 1.0, 0.5, 0.1, 1.0], "by_op": {"all_reduce": {"bytes_sent": 8}},
                "eval_loss": 3.0, "train_loss": 3.1}  # fmt: skip
        (parts / f"rank{i}.json").write_text(json.dumps(part))
    return stopped


SUMMARY_DAMAGE = {
    "truncated": (lambda t: t[:12], "not valid JSON"),
    "row too short": (lambda t: _edit(t, row=[1.0, 2.0]), "'row' should be a list of 5"),
    "by_op a list": (lambda t: _edit(t, by_op=[]), "'by_op' should be an object"),
    "bytes_sent a string": (
        lambda t: _edit(t, by_op={"all_reduce": {"bytes_sent": "8"}}), "'bytes_sent'",
    ),
    "eval_loss a string": (lambda t: _edit(t, eval_loss="3.0"), "'eval_loss'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SUMMARY_DAMAGE))
def test_corrupt_worker_summary_on_elastic_resume(stopped, data, capsys, case):
    run = _elastic_run(stopped, data)
    path = run / "summaries" / "rank1.json"
    damage, says = SUMMARY_DAMAGE[case]
    path.write_text(damage(path.read_text()))
    _refused(["train", "--resume", str(run)], run, capsys, str(path), says)


def test_elastic_launcher_checks_the_summaries_before_it_starts_anything(stopped, data):
    """The same check inside launch_elastic (a resume with no checkpoint gets there directly)."""
    run = _elastic_run(stopped, data)
    (run / "summaries" / "rank0.json").write_text("{")
    before = snapshot(run)
    cfg = dataclasses.replace(RunDir(run).load_config(), lighthouse="http://127.0.0.1:1")
    with pytest.raises(RunFileError, match="rank0.json is corrupt"):
        launch_elastic(cfg, RunDir(run), resume=True)
    assert snapshot(run) == before  # no events.jsonl, elastic.json or secret


ELASTIC_JSON_DAMAGE = {
    "truncated": ('{"admission": "h', "not valid JSON"),
    "a list": ('["host:1"]', "should hold a JSON object"),
    "port missing": ('{"admission": "host", "workers": 2}', "should be HOST:PORT"),
    "admission a number": ('{"admission": 5, "workers": 2}', "'admission' should be a string"),
}


@pytest.mark.parametrize("case", list(ELASTIC_JSON_DAMAGE))
def test_corrupt_elastic_json(tmp_path, case):
    text, says = ELASTIC_JSON_DAMAGE[case]
    (tmp_path / "elastic.json").write_text(text)
    with pytest.raises(RunFileError, match=says.replace("(", r"\(")):
        admission_address(tmp_path)
    (tmp_path / "elastic.json").write_text('{"admission": "host:4242", "workers": 2}')
    assert admission_address(tmp_path) == "host:4242"


@pytest.mark.parametrize("case", list(ELASTIC_JSON_DAMAGE))
def test_join_with_a_corrupt_elastic_json(tmp_path, capsys, case):
    """Needs cmd_join to read elastic.json through admission_address (lowband.launch.admission)."""
    (tmp_path / "elastic.json").write_text(ELASTIC_JSON_DAMAGE[case][0])
    (tmp_path / "secret").write_text("s3cret\n")
    _refused(["join", str(tmp_path)], tmp_path, capsys, "elastic.json")


@pytest.mark.parametrize(
    "answer, says",
    [
        (b"\xff{", "not valid JSON"),
        (b"[1]", "should be a JSON object"),
        (b'{"run": "r", "index": "1", "config": {}, "lighthouse": "l", "store": "s"}', "'index'"),
        (b'{"run": "r", "index": 1, "config": {}, "store": "s"}', "no 'lighthouse'"),
    ],
)
def test_a_bad_admission_answer_is_one_line(answer, says):
    with pytest.raises(RunFileError, match=says):
        parse_admission(answer)


# -- finetune --resume -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"algo": "zo", "steps": ', '{"algo": "zo", "steps": "many"}'])
def test_finetune_resume_with_a_corrupt_config(tmp_path, capsys, text):
    """Needs cmd_finetune to load the saved config through RunDir.load_finetune_config."""
    (tmp_path / "config.json").write_text(text)
    _refused(["finetune", "--resume", str(tmp_path)], tmp_path, capsys, "config.json is corrupt")
