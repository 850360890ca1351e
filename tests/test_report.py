"""The comparison report, on synthetic run folders written in the training loop's format."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lowband.errors import LowbandError
from lowband.report import format_bytes, format_seconds, load_run, write_report
from lowband.report.html import format_count
from lowband.report.plots import ema
from lowband.report.runs import unique_labels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("loss_vs_tokens.png", "loss_vs_wall.png", "loss_vs_bytes.png")


def line(step: int, rank: int, *, with_eval: bool = True, nan_from: int | None = None) -> dict:
    """One metrics line. Rank r sends 1000*(r+1) bytes per step; eval every 10 steps."""
    loss = 5.0 - 0.05 * step + 0.01 * rank
    rec = {
        "step": step,
        "tokens": 1024 * step,
        "train_loss": loss if nan_from is None or step < nan_from else math.nan,
        "lr": 1e-3,
        "bytes_sent": 1000 * (rank + 1) * step,
        "bytes_recv": 1000 * step,
        "compute_time": (0.15 if rank == 0 else 0.1) * step,
        "comm_time": 0.02 * step,
        "wall_time": 0.2 * step,
        "rank": rank,
        "outer_step": step // 10,  # unknown keys must be ignored
    }
    if with_eval and step % 10 == 0:
        rec["eval_loss"] = 5.1 - 0.05 * step if nan_from is None or step < nan_from else math.nan
    return rec


def make_run(
    root: Path,
    name: str,
    steps_per_rank: tuple[int, ...] = (40, 40),
    *,
    complete: bool = True,
    **line_kw,
) -> Path:
    run = root / name
    (run / "metrics").mkdir(parents=True)
    config = {"algo": "ddp", "model": "tiny", "workers": len(steps_per_rank), "link": "none"}
    config |= {"steps": max(steps_per_rank), "batch_size": 4, "seq_len": 256}
    (run / "config.json").write_text(json.dumps(config))
    meta = {
        "lowband_version": "0.1.0",
        "torch_version": "2.13.0",
        "python": "3.11.2",
        "hostname": "<host & co>",
        "platform": "linux",
        "device": "cpu",
        "git_commit": "abc123",
        "corpus": {"name": "tiny", "sha256": "f" * 64, "num_tokens": 10**6, "description": "x"},
        "model_params": 1_234_567,
        "world_size": len(steps_per_rank),
        "started": "2025-01-01T00:00:00+00:00",
    }
    (run / "meta.json").write_text(json.dumps(meta))
    for rank, n in enumerate(steps_per_rank):
        lines = [json.dumps(line(s, rank, **line_kw)) for s in range(1, n + 1)]
        (run / "metrics" / f"rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    if complete:
        summary = {
            "final_eval_loss": 3.1,
            "bytes_by_op": {"all_reduce": 100000, "broadcast": 20000},
        }
        (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    done = make_run(tmp_path, "ddp-done")
    crashed = make_run(tmp_path, "ddp-crashed", (25, 23), complete=False)
    return done, crashed


def test_final_numbers_from_the_metrics(two_runs: tuple[Path, Path]) -> None:
    done, crashed = (load_run(p).final() for p in two_runs)
    # Complete: 40 steps on both ranks; last eval at step 40 = 5.1 - 2.0.
    assert done["final_eval_loss"] == pytest.approx(3.1)
    assert done["loss_source"] == "eval"
    assert done["bytes_sent_total"] == 40_000 + 80_000
    assert done["bytes_sent_per_worker"] == 60_000
    assert done["tokens_per_s"] == pytest.approx(40 * 1024 / 8.0)  # 5120
    assert done["compute_utilisation"] == pytest.approx((6.0 + 4.0) / (8.0 + 8.0))  # 0.625
    assert done["wall_time"] == pytest.approx(8.0)
    assert done["complete"] is True
    # Crashed: rank 0 reached step 25, rank 1 step 23; last eval at step 20 = 5.1 - 1.0.
    assert crashed["final_eval_loss"] == pytest.approx(4.1)
    assert crashed["bytes_sent_total"] == 25_000 + 46_000
    assert crashed["bytes_sent_per_worker"] == 35_500
    assert crashed["tokens_per_s"] == pytest.approx(25 * 1024 / 5.0)
    assert crashed["compute_utilisation"] == pytest.approx((3.75 + 2.3) / (5.0 + 4.6))
    assert crashed["complete"] is False


def test_arrays_are_means_over_workers(two_runs: tuple[Path, Path]) -> None:
    run = load_run(two_runs[1])
    assert run.label == "ddp-crashed"
    np.testing.assert_array_equal(run.steps, np.arange(1, 26))
    # Steps 1-23: both ranks (1000 and 2000 per step); steps 24-25: rank 0 only, so no mean.
    np.testing.assert_allclose(run.bytes_sent[:23], 1500 * np.arange(1, 24))
    assert np.isnan(run.bytes_sent[23:]).all()
    np.testing.assert_allclose(run.train_loss[0], 5.0 - 0.05 + 0.005)
    np.testing.assert_allclose(run.train_loss[-1], 5.0 - 0.05 * 25)  # rank 0 alone
    np.testing.assert_array_equal(run.eval_steps, [10, 20])
    np.testing.assert_allclose(run.eval_tokens, [10_240, 20_480])
    np.testing.assert_allclose(run.eval_wall_time, [2.0, 4.0])
    np.testing.assert_allclose(run.eval_bytes_sent, [15_000, 30_000])
    assert any("summary.json" in w for w in run.warnings)


def test_write_report(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    index = write_report(list(two_runs), tmp_path / "report", title="DDP <test>")
    assert index == tmp_path / "report" / "index.html"
    for name in PLOTS:
        png = (tmp_path / "report" / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        assert len(png) > 10_000
    page = index.read_text()
    assert "ddp-done" in page and "ddp-crashed" in page
    assert "3.1000" in page and "4.1000" in page
    assert page.count('src="data:image/png;base64,') == 3
    assert not re.search(r"https?://", page)
    assert "DDP &lt;test&gt;" in page and "&lt;host &amp; co&gt;" in page  # escaped
    assert "incomplete" in page and "1.23M params" in page
    # Bold marks the best among complete runs: the crashed run sent fewer bytes (71.0 KB) only
    # because it stopped early.
    assert "<strong>120 KB</strong>" in page and "<strong>3.1000</strong>" in page
    assert "<strong>71.0 KB</strong>" not in page
    assert "all_reduce" in page  # bytes_by_op from summary.json


def test_single_run_no_eval_and_nan(tmp_path: Path) -> None:
    no_eval = make_run(tmp_path, "no-eval", with_eval=False, complete=False)
    diverged = make_run(tmp_path, "diverged", nan_from=30)
    assert load_run(no_eval).final()["loss_source"] == "train"
    assert load_run(no_eval).final()["final_eval_loss"] == pytest.approx(5.0 - 2.0 + 0.005)
    # Without eval lines but with a summary, the summary's final eval loss is used.
    with_summary = make_run(tmp_path, "no-eval-summary", with_eval=False)
    assert load_run(with_summary).final()["loss_source"] == "summary"
    assert math.isnan(load_run(diverged).final()["final_eval_loss"])

    page = write_report([no_eval], tmp_path / "single").read_text()
    assert "(train)" in page
    page = write_report([no_eval, diverged], tmp_path / "both").read_text()
    assert "NaN (diverged)" in page and "complete · diverged" in page
    for name in PLOTS:
        assert (tmp_path / "both" / name).read_bytes().startswith(PNG_SIGNATURE)


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(LowbandError, match="not a run folder"):
        load_run(tmp_path)
    with pytest.raises(LowbandError, match="not a run folder"):
        write_report([tmp_path / "missing"], tmp_path / "out")
    with pytest.raises(LowbandError):
        write_report([], tmp_path / "out")


def test_empty_or_corrupt_metrics(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "metrics").mkdir(parents=True)
    (empty / "metrics" / "rank0.jsonl").write_text("")
    with pytest.raises(LowbandError, match="no metrics"):
        load_run(empty)

    corrupt = make_run(tmp_path, "corrupt")
    file = corrupt / "metrics" / "rank1.jsonl"
    lines = file.read_text().splitlines()
    lines[5] = lines[5][:20]
    file.write_text("\n".join(lines))
    with pytest.raises(LowbandError, match=r"rank1\.jsonl:6 is corrupt"):
        load_run(corrupt)


def test_truncated_last_line_is_a_crash_not_an_error(tmp_path: Path) -> None:
    run = make_run(tmp_path, "cut", complete=False)
    file = run / "metrics" / "rank0.jsonl"
    file.write_text(file.read_text().rstrip("\n")[:-15])
    data = load_run(run)
    assert data.steps[-1] == 39 and not data.complete
    assert any("truncated" in w for w in data.warnings)


def test_duplicate_labels(tmp_path: Path) -> None:
    paths = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]
    assert unique_labels(paths) == ["a/run", "b/run", "c"]
    assert unique_labels([tmp_path / "x", tmp_path / "x"]) == ["x", "x (2)"]


def test_formatters() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1234) == "1.23 KB"
    assert format_bytes(999_700) == "1.00 MB"
    assert format_bytes(45_600_000) == "45.6 MB"
    assert format_bytes(123_400_000_000) == "123 GB"
    assert format_bytes(math.nan) == "–"
    assert format_seconds(0.85) == "850 ms"
    assert format_seconds(12.34) == "12.3 s"
    assert format_seconds(245) == "4 min 05 s"
    assert format_seconds(2 * 3600 + 3 * 60 + 10) == "2 h 03 min"
    assert format_count(1_234_567) == "1.23M" and format_count(5120) == "5.12K"


def test_ema_skips_nan_and_is_debiased() -> None:
    out = ema(np.array([2.0, 2.0, math.nan, 2.0]), weight=0.9)
    np.testing.assert_allclose(out[[0, 1, 3]], 2.0)
    assert math.isnan(out[2])
