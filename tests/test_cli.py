"""The CLI end to end: training, resume equivalence, and every bad input (one line, exit 2, nothing lost)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from threaded_runs import workers_as_threads

from lowband.cli import main

FAST = [
    "--steps",
    "12",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--eval-every",
    "6",
    "--eval-batches",
    "2",
]


def metrics(run: Path, rank: int = 0) -> list[dict]:
    """The step lines of a worker's metrics (events, such as `resumed`, left out)."""
    lines = (run / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def events(run: Path, kind: str, rank: int = 0) -> list[dict]:
    lines = (run / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


# -- a real run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "a"
    assert main(["train", "--workers", "2", "--out", str(out), "--ckpt-every", "6", *FAST]) == 0
    return out


def test_run_folder_has_everything(done_run):
    cfg = json.loads((done_run / "config.json").read_text())
    meta = json.loads((done_run / "meta.json").read_text())
    summary = json.loads((done_run / "summary.json").read_text())
    assert cfg["algo"] == "ddp" and cfg["workers"] == 2
    assert (
        len(meta["corpus"]["sha256"]) == 64 and meta["world_size"] == 2 and meta["model_params"] > 0
    )
    assert meta["torch_version"] and meta["backend"] == "gloo"
    lines0, lines1 = metrics(done_run, 0), metrics(done_run, 1)
    assert [m["step"] for m in lines0] == [5, 6, 10, 12] == [m["step"] for m in lines1]
    assert [("eval_loss" in m) for m in lines0] == [False, True, False, True]
    # DDP keeps workers identical: the same eval loss on both
    assert [m.get("eval_loss") for m in lines0] == [m.get("eval_loss") for m in lines1]
    last = lines0[-1]
    for key in (
        "tokens",
        "train_loss",
        "bytes_sent",
        "bytes_recv",
        "compute_time",
        "comm_time",
        "wall_time",
    ):
        assert key in last
    assert last["tokens"] == 12 * 2 * 32 * 2
    assert summary["final_eval_loss"] == last["eval_loss"]
    assert 0 < summary["compute_utilisation"] <= 1
    # bytes: one all-reduce of the gradients per step; the workers start bit-identical (same seed),
    # which one 8-byte digest each proves, so no parameters are broadcast
    n_params = meta["model_params"]
    assert summary["bytes_by_op"]["all_reduce"] == 12 * n_params * 4
    assert "broadcast" not in summary["bytes_by_op"]
    assert sorted(p.name for p in (done_run / "ckpt").iterdir()) == ["step_0000006", "step_0000012"]


def test_report_cli(done_run, tmp_path, capsys):
    assert main(["report", str(done_run), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "index.html").exists()
    for name in ("loss_vs_tokens.png", "loss_vs_wall.png", "loss_vs_bytes.png"):
        assert (tmp_path / "rep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reproduces_the_uninterrupted_run(done_run, tmp_path, capsys):
    """Kill worker 1 after step 9 (checkpoint at 6), resume: the loss curve equals the uninterrupted run."""
    b = tmp_path / "b"
    code = main(
        ["train", "--workers", "2", "--out", str(b), "--ckpt-every", "6", "--fail-at", "1:9", *FAST]
    )
    assert code == 1
    assert "worker 1" in capsys.readouterr().err
    assert not (b / "summary.json").exists()
    assert main(["train", "--resume", str(b)]) == 0
    for rank in (0, 1):
        (resumed,) = events(b, "resumed", rank)  # from checkpoint 6, its state proven by digest
        assert resumed["from_step"] == 6
        ref, got = metrics(done_run, rank), metrics(b, rank)
        assert [m["step"] for m in got] == [m["step"] for m in ref]
        assert [m["train_loss"] for m in got] == [m["train_loss"] for m in ref]
        assert [m.get("eval_loss") for m in got] == [m.get("eval_loss") for m in ref]
        assert [m["bytes_sent"] for m in got] == [m["bytes_sent"] for m in ref]
    assert (
        json.loads((b / "summary.json").read_text())["final_eval_loss"]
        == metrics(done_run)[-1]["eval_loss"]
    )
    # a finished run resumed again has nothing to do and changes nothing
    before = snapshot(b)
    assert main(["train", "--resume", str(b)]) == 0
    assert snapshot(b) == before


def test_resume_refuses_changed_flags(done_run, capsys):
    before = snapshot(done_run)
    assert main(["train", "--resume", str(done_run), "--lr", "0.5"]) == 2
    assert "--lr" in error_line(capsys)
    assert snapshot(done_run) == before


def test_single_worker_runs_in_process(tmp_path):
    out = tmp_path / "one"
    assert main(["train", "--workers", "1", "--out", str(out), "--tokens", "640", *FAST[2:]]) == 0
    assert metrics(out)[-1]["step"] == 10  # token budget: 640 / (2 x 32)
    assert metrics(out)[-1]["bytes_sent"] == 0


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--algo", "magic"], "unknown algorithm 'magic'"),
        (["--model", "7b"], "unknown model preset '7b'"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--link", "100mbit"], "malformed --link"),
        (["--link", "fast:50ms"], "malformed --link"),
        (["--data", "/no/such/path"], "does not exist"),
        (["--schedule", "zigzag"], "unknown --schedule"),
        (["--fail-at", "9:1"], "--fail-at"),
        (["--seq-len", "10000000"], "seq_len"),
        (
            ["--algo", "diloco", "--fragments", "4"],
            "--fragments applies to --algo streaming-diloco, not diloco",
        ),
        (
            ["--algo", "streaming-diloco", "--sync-every", "10", "--fragments", "4"],
            "multiple of --fragments",
        ),
        (
            [
                "--algo",
                "streaming-diloco",
                "--sync-every",
                "8",
                "--fragments",
                "4",
                "--overlap",
                "2",
            ],
            "--overlap 2",
        ),
        (["--algo", "diloco", "--bits", "3"], "bits"),
        (["--algo", "streaming-diloco", "--mix", "2"], "--mix"),
        (["--algo", "noloco", "--group-size", "1"], "--group-size"),
        (["--algo", "ddp", "--group-size", "2"], "--group-size applies to --algo noloco, not ddp"),
        (["--algo", "co2", "--co2-delay", "3"], "--co2-delay"),
        (
            ["--outer-lr", "0.5"],
            "--outer-lr applies to --algo streaming-diloco, diloco, noloco, co2, not ddp",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, flags, needle):
    out = tmp_path / "x"
    assert main(["train", "--out", str(out), *flags]) == 2
    assert needle in error_line(capsys)
    assert not out.exists()  # nothing was created


def test_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--out", str(tmp_path / "x"), "--data", str(empty)]) == 2
    assert "empty" in error_line(capsys)


def test_bad_flag_value_from_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--steps", "many"])
    assert e.value.code == 2
    assert "--steps" in error_line(capsys)


def test_out_folder_holding_another_run_is_never_overwritten(done_run, capsys):
    before = snapshot(done_run)
    assert main(["train", "--out", str(done_run), "--seed", "3"]) == 2
    assert "already holds a run" in error_line(capsys)
    assert snapshot(done_run) == before


def test_corrupt_checkpoint_is_refused_and_kept(done_run, tmp_path, capsys):
    run = tmp_path / "corrupt"
    shutil.copytree(done_run, run)
    (run / "summary.json").unlink()  # pretend it stopped, so a resume would train
    shutil.rmtree(run / "ckpt" / "step_0000012")
    target = run / "ckpt" / "step_0000006" / "rank1.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    assert "corrupt" in error_line(capsys)
    assert snapshot(run) == before


def test_checkpoint_of_another_run_is_refused(done_run, tmp_path, capsys):
    run = tmp_path / "other"
    shutil.copytree(done_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["seed"] = 5  # the folder now claims a different run than its checkpoints hold
    (run / "config.json").write_text(json.dumps(cfg))
    shutil.rmtree(run / "ckpt" / "step_0000012")
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    assert "different run" in error_line(capsys)
    assert snapshot(run) == before


def test_resume_without_checkpoint(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a lowband run" in error_line(capsys)


def test_real_cli_prints_no_traceback(tmp_path):
    """The installed command, in a fresh process: one line on stderr, exit 2."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowband.cli",
            "train",
            "--link",
            "1gbit:xx",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert (
        r.stderr.count("\n") == 1 and "malformed --link" in r.stderr and "Traceback" not in r.stderr
    )


def test_under_torchrun_the_rendezvous_comes_from_the_environment(tmp_path):
    out = tmp_path / "tr"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lowband.cli", "train",
         "--out", str(out), *FAST],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("run folder:") == 1  # only rank 0 speaks
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["backend"] == "gloo"
    assert metrics(out, 0)[-1]["eval_loss"] == metrics(out, 1)[-1]["eval_loss"]


def test_streaming_diloco_resumes_from_a_checkpoint_taken_mid_flight(tmp_path, capsys):
    """Checkpoints at 3 and 6 fall inside overlap windows (fragment reductions start at 2 and 6)."""
    algo = [
        "--algo",
        "streaming-diloco",
        "--sync-every",
        "8",
        "--fragments",
        "2",
        "--overlap",
        "2",
        "--bits",
        "4",
    ]
    common = ["--workers", "2", "--ckpt-every", "3", "--log-every", "1", *algo, *FAST]
    ref, b = tmp_path / "ref", tmp_path / "b"
    with workers_as_threads():  # the uninterrupted reference: its numbers only (threaded_runs)
        assert main(["train", "--out", str(ref), *common]) == 0
    assert main(["train", "--out", str(b), "--fail-at", "0:5", *common]) == 1
    assert main(["train", "--resume", str(b)]) == 0
    for rank in (0, 1):
        got, want = metrics(b, rank), metrics(ref, rank)
        assert [m["train_loss"] for m in got] == [m["train_loss"] for m in want]
        assert [m["outer_step"] for m in got] == [m["outer_step"] for m in want]
        # Bytes of a background reduction are counted when the background thread sends them, so a
        # line written while one is in flight may or may not include it: compare where none is.
        settled = lambda ms: [m["bytes_sent"] for m in ms if m["step"] % 4 == 0]  # noqa: E731
        assert settled(got) == settled(want)
    assert metrics(ref)[-1]["outer_step"] == 3  # syncs at 4, 8, 12


@pytest.mark.parametrize(
    "command, flags, message",
    [
        ("train", ["--device", "tpu"], "unknown --device 'tpu'"),
        ("finetune", ["--device", "tpu"], "unknown --device 'tpu'"),
    ]
    + (
        []
        if __import__("torch").cuda.is_available()
        else [("train", ["--device", "cuda"], "--device cuda needs")]
    ),
)
def test_a_refused_device_leaves_no_run_folder(tmp_path, capsys, command, flags, message):
    out = tmp_path / "x"
    assert main([command, *flags, "--out", str(out)]) == 2
    assert message in error_line(capsys)
    assert not out.exists()  # the same --out is still free


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, done_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["train", "--out", str(blocker / "run"), *FAST]) == 2
    assert "cannot create the run folder" in error_line(capsys)
    assert main(["report", str(done_run), "--out", str(blocker / "report")]) == 2
    assert "cannot create the report folder" in error_line(capsys)


# -- --link-map -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, flags, needle",
    [
        ("{", [], "not JSON"),
        (
            '{"sites": [[0, 1]], "intra": "1gbit:1ms", "inter": "1gbit:9ms"}',
            [],
            "no link between workers 0 and 2",
        ),
        ('{"default": "1gbit:1ms"}', ["--link", "1gbit:1ms"], "exclude each other"),
        ('{"default": "1gbit:1ms"}', ["--elastic"], "--elastic does not combine with --link-map"),
    ],
)
def test_bad_link_map_is_one_line_exit_2(tmp_path, capsys, content, flags, needle):
    m = tmp_path / "map.json"
    m.write_text(content)
    out = tmp_path / "x"
    assert main(["train", "--workers", "4", "--out", str(out), "--link-map", str(m), *flags]) == 2
    assert needle in error_line(capsys)
    assert not out.exists()
