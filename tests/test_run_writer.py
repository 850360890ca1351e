"""Runs that `lowband report` can plot, from your own loop and from `lowband finetune` (issue #19,
points 5 and 6).

lowband.RunWriter writes the run folder `lowband train` writes (config, meta, metrics per rank,
summary), so a report puts an own-loop run beside a CLI run. `lowband finetune` logs an
evaluation at step 0, where its curve starts; byte figures print in readable units.
"""

from __future__ import annotations

import json

import pytest
import torch

import lowband
from lowband.cli import main
from lowband.errors import RunDirError
from lowband.models import ModelConfig, build_model
from lowband.report import load_run
from lowband.testing import run_ranks
from lowband.train.progress import ProgressBar

CFG = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=256)
TINY = ["--seq-len", "32", "--batch-size", "2", "--eval-batches", "1"]
STEPS, BATCH, LEN = 6, 2, 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _own_loop(comm, path):
    """A user's loop: DiLoCo on a tiny model, the RunWriter beside it."""
    model = build_model(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    algo = lowband.DiLoCo(model, opt, comm, sync_every=3)
    evals = torch.randint(0, 256, (2, LEN + 1), generator=torch.Generator().manual_seed(9))
    with lowband.RunWriter(
        path, comm, algo=algo, model=model, tokens_per_step=BATCH * LEN * comm.size,
        config={"model": "tiny"},
    ) as run:  # fmt: skip
        for step in range(1, STEPS + 1):
            g = torch.Generator().manual_seed(100 * step + comm.rank)
            t = torch.randint(0, 256, (BATCH, LEN + 1), generator=g)
            loss = model.loss(t[:, :-1], t[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            algo.step()
            eval_loss = None
            if step % 3 == 0:
                with torch.no_grad():
                    eval_loss = model.loss(evals[:, :-1], evals[:, 1:]).item()
            run.log(step, train_loss=loss.item(), eval_loss=eval_loss, lr=1e-2)
    return comm.stats.bytes_sent, algo.outer_steps


def test_an_own_loop_run_is_reported_beside_a_cli_run(tmp_path):
    own = tmp_path / "own-diloco"
    (sent0, outer), (sent1, _) = run_ranks(2, _own_loop, own)
    cli = tmp_path / "cli-ddp"
    argv = ["train", "--workers", "1", "--steps", "4", "--eval-every", "2", "--out", str(cli)]
    assert main([*argv, *TINY]) == 0

    data = load_run(own)
    assert data.complete and data.warnings == []
    assert data.config["algo"] == "diloco" and data.config["workers"] == 2
    assert data.config["options"]["sync_every"] == 3 and data.config["model"] == "tiny"
    assert data.meta["world_size"] == 2 and data.meta["model_params"] > 0
    assert list(data.steps) == list(range(1, STEPS + 1)) and list(data.eval_steps) == [3, 6]
    assert data.tokens[-1] == STEPS * BATCH * LEN * 2
    fin = data.final()
    assert fin["outer_steps"] == outer == 2 and fin["bytes_sent_total"] == sent0 + sent1
    summary = json.loads((own / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_eval_loss"] == data.eval_loss[-1]
    assert summary["bytes_sent_total"] == sent0 + sent1 > 0

    report = tmp_path / "report"
    assert main(["report", str(own), str(cli), "--out", str(report)]) == 0
    page = (report / "index.html").read_text()
    for png in ("loss_vs_tokens.png", "loss_vs_wall.png", "loss_vs_bytes.png"):
        assert (report / png).stat().st_size > 1000
    assert "<td>diloco</td>" in page and "own-diloco" in page and "cli-ddp" in page
    assert page.count('<td class="complete">complete</td>') == 2


def test_a_taken_folder_is_refused_on_every_rank(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")

    def body(comm):
        with pytest.raises(RunDirError, match="not empty"):
            lowband.RunWriter(tmp_path / "taken", comm, tokens_per_step=1)
        return True

    assert run_ranks(2, body) == [True, True]
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["notes.txt"]


def test_finetune_logs_an_evaluation_at_step_0(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--steps", "2", "--workers", "1", "--out", str(out), *TINY]) == 0
    lines = [json.loads(x) for x in (out / "metrics" / "rank0.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[-1]["step"] == 2
    first = lines[0]
    assert first["tokens"] == 0 and "train_loss" not in first and first["eval_loss"] > 0
    data = load_run(out)
    assert list(data.eval_steps) == [0, 2] and data.eval_tokens[0] == 0
    assert "sent 0 B" in capsys.readouterr().err  # the progress line: no "0.0 MB"


def test_byte_figures_are_readable(capsys):
    assert [lowband.comm.accounting.format_bytes(n) for n in (60, 1234, 45_600_000)] == [
        "60 B",
        "1.23 KB",
        "45.6 MB",
    ]
    bar = ProgressBar(1, 0, "zo x2 1m")  # stderr is not a terminal here: a plain line
    bar.update(1, tokens_per_s=10.0, loss=1.0, bytes_sent=60, eval_loss=None,
               extra={"peak_sync_bytes": 1234})  # fmt: skip
    err = capsys.readouterr().err
    assert "sent 60 B" in err and "peak/sync 1.23 KB" in err
    bar = ProgressBar(1, 0, "old caller")
    bar.update(1, tokens_per_s=10.0, loss=1.0, mb_sent=60 / 1e6, eval_loss=None)
    assert "sent 60 B" in capsys.readouterr().err
