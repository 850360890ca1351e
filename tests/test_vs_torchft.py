"""docs/own-loop.md, kept honest: its code blocks run here, and its line counts are counted here.

lowband's DiLoCo (static and on its elastic group) and torchft 0.2.0's DiLoCo wrap the doc's loop
on two workers (threads, as torchft's own tests run replicas), from the same weights and on the
same batches: the final parameters must be bit-identical, on every worker and across the three.
"""

from __future__ import annotations

import re
import threading
import traceback
from pathlib import Path

import torch
from torch import nn

from lowband.testing import run_ranks

DOC = Path(__file__).resolve().parent.parent / "docs" / "own-loop.md"
H, ROUNDS, WORKERS = 3, 2, 2
_SEEDING = threading.Lock()  # workers are threads: torch's global generator is shared


def _blocks() -> dict[str, str]:
    """The doc's python blocks, by their first line's comment ("# lowband", "# torchft", ...)."""
    out = {}
    for code in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S):
        first, _, _ = code.partition("\n")
        out[first.lstrip("# ").strip()] = code
    return out


def _lines(code: str) -> int:
    """Lines a block adds to the loop: neither blank, nor a comment, nor the loop's own call."""
    lines = [line.strip() for line in code.splitlines()]
    return sum(1 for line in lines if line and not line.startswith(("#", "train(")))


def _setup(replica: int, apart: bool = False) -> dict:
    """What each block expects to find: the model, its optimizer, this worker's batches, H.
    `apart`: replica 1 starts from other weights."""
    with _SEEDING:
        torch.manual_seed(1 if apart and replica == 1 else 0)  # else the same weights everywhere
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(100 + replica)  # each worker its own data
    batches = [(torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g))]
    env = {"torch": torch, "model": model, "H": H, "replica": replica}
    env["inner_opt"] = torch.optim.AdamW(model.parameters(), lr=1e-2)
    env["batches"] = batches * (H * ROUNDS)
    exec(_blocks()["the loop"], env)  # defines train()
    return env


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _threads(block: str, extra: dict, apart: bool = False) -> list[torch.Tensor]:
    """Run the block on WORKERS threads, one replica each; the final parameters by replica."""
    out: list = [None] * WORKERS
    errors: list[str] = []

    def body(replica: int) -> None:
        try:
            env = {**_setup(replica, apart), **extra}
            exec(_blocks()[block], env)
            out[replica] = _flat(env["model"])
        except BaseException:  # noqa: BLE001 - reported below
            errors.append(f"replica {replica}:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, "\n".join(errors)
    assert all(not t.is_alive() for t in threads), f"{block}: a replica hung"
    return out


def _on_lighthouse(block: str, apart: bool = False) -> list[torch.Tensor]:
    """Run a block that needs a Lighthouse, on a fresh one."""
    from torchft.coordination import LighthouseServer

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=WORKERS, quorum_tick_ms=20)
    try:
        return _threads(block, {"lighthouse": lighthouse.address()}, apart)
    finally:
        lighthouse.shutdown()


def _static(apart: bool = False) -> list[torch.Tensor]:
    def body(comm):
        env = {**_setup(comm.rank, apart), "pg": comm.group}
        exec(_blocks()["lowband"], env)
        return _flat(env["model"])

    return run_ranks(WORKERS, body)


def test_the_doc_s_line_counts():
    blocks = _blocks()
    row = re.search(r"^\| lines your loop adds \|(.*)\|$", DOC.read_text(), re.M)
    assert row is not None
    claimed = [int(x) for x in row.group(1).split("|")]
    counted = [_lines(blocks[k]) for k in ("lowband", "lowband, fault tolerant", "torchft")]
    assert claimed == counted


def test_lowband_and_torchft_end_bit_identical():
    ours = _static()
    theirs = _on_lighthouse("torchft")
    elastic = _on_lighthouse("lowband, fault tolerant")
    assert not torch.equal(ours[0], _flat(_setup(0)["model"]))  # they trained
    for name, run in (("lowband", ours), ("torchft", theirs), ("lowband elastic", elastic)):
        for replica, params in enumerate(run):
            assert torch.equal(params, ours[0]), f"{name}, replica {replica}"


def test_workers_that_start_apart():
    """The table's row: lowband broadcasts rank 0's weights at construction, its elastic group
    repairs them at the first commit; torchft with init_sync=False leaves them apart."""
    ours = _static(apart=True)
    elastic = _on_lighthouse("lowband, fault tolerant", apart=True)
    theirs = _on_lighthouse("torchft", apart=True)
    assert torch.equal(ours[0], ours[1]) and torch.equal(ours[0], _static()[0])
    assert torch.equal(elastic[0], elastic[1])
    assert not torch.equal(theirs[0], theirs[1])
