"""`lowband serve --parallel tp|pp|lamina|splitwise --workers 2`: real processes, real HTTP on loopback; each
completion is `lowband generate`'s text for the same prompt, seed and mode."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from lowband.serve import GenerateConfig
from lowband.serve.worker import generate


def start(*flags: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "lowband.cli", "serve", "--port", "0", "--max-tokens", "16"]
    proc = subprocess.Popen([*cmd, *flags], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    port = re.search(r"127\.0\.0\.1:(\d+)/", line)
    assert port, line
    return proc, int(port.group(1))


def post(port: int, body: dict, raw: bytes | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=raw or json.dumps(body).encode())
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)  # to the launcher alone, as `kill PID` does
    try:
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, proc.stderr.read()


@pytest.mark.parametrize(
    "mode",
    [["tp", "--allreduce", "star"], ["pp"], ["lamina"], ["splitwise"]],
    ids=["tp", "pp", "lamina", "splitwise"],
)
def test_served_completions_are_the_generate_text(mode):
    """Every mode gives one process's tokens in fp32 (tests/test_serve_parallel.py), so each
    completion is compared with one process's `lowband generate` text."""
    proc, port = start("--parallel", *mode, "--workers", "2")
    try:
        prompts = ["def f(", "import os"]
        with ThreadPoolExecutor(2) as pool:  # concurrent: one batch when they meet
            body = {"max_tokens": 8, "temperature": 0}
            got = list(pool.map(lambda p: post(port, {"prompt": p, **body}), prompts))
        status, text = post(
            port, {"prompt": "x", "max_tokens": 6, "stream": True, "temperature": 0}
        )
        assert status == 200
        events = [e[len("data: ") :] for e in text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        bad, body = post(port, {}, raw=b'{"prompt": "a", "max_tokens": 99}')
        assert bad == 400 and "max_tokens must be" in body
        assert post(port, {"prompt": "x", "max_tokens": 2, "temperature": 0})[0] == 200
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert [s for s, _ in got] == [200, 200]
    local = [
        generate(GenerateConfig(prompt=p, max_new_tokens=n, quiet=True))[0]["text"]
        for p, n in [("def f(", 8), ("import os", 8), ("x", 6)]
    ]  # one process
    served = [json.loads(t)["choices"][0]["text"] for _, t in got]
    assert [*served, streamed] == local


def test_bad_parallel_serve_is_one_line_and_exit_2(capsys):
    from lowband.cli import main

    for argv, message in [
        (["--parallel", "tp", "--workers", "3"], "does not divide the model's 4 attention heads"),
        (["--parallel", "pp", "--workers", "5"], "--workers 5 stages for the model's 4 layers"),
        (["--parallel", "colocated", "--workers", "2"], "is for lowband generate only"),
        (["--parallel", "splitwise", "--workers", "1"], "needs a prefill pool and a decode pool"),
        (["--workers", "2"], "--workers 2 needs --parallel tp or pp"),
    ]:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_dead_worker_is_a_503_and_the_server_exits_nonzero():
    proc, port = start("--parallel", "tp", "--workers", "2")
    try:
        assert post(port, {"prompt": "a", "max_tokens": 2})[0] == 200  # every worker is up
        pids = subprocess.run(
            ["pgrep", "-P", str(proc.pid), "-f", "spawn_main"], capture_output=True, text=True
        ).stdout.split()
        os.kill(int(sorted(pids, key=int)[-1]), signal.SIGKILL)  # worker 1, started last
        status, body = post(port, {"prompt": "a", "max_tokens": 8})
        assert status == 503 and "a worker failed" in body, body
        rc = proc.wait(30)
    except (ConnectionError, http.client.HTTPException):  # the launcher stopped worker 0 first
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 1
    assert "worker 1 failed" in proc.stderr.read()
