"""`lowband serve` over real HTTP on loopback: completions, SSE streaming, bad requests, a load test."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lowband.models import build_model
from lowband.serve import GenerateConfig
from lowband.serve.config import ServeConfig
from lowband.serve.engine import generate_local
from lowband.serve.http import make_server

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def server():
    model = build_model("1m", seed=3).eval().requires_grad_(False)
    model.output.weight.mul_(30.0)
    cfg = ServeConfig(port=0, max_tokens=32, queue=16)
    srv, sock, engine = make_server(cfg, model, 4096)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield sock.getsockname()[1], model, engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


def request(port: int, method: str, path: str, body=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.getheader("Content-Type"), resp.read().decode()
    conn.close()
    return out


def expected(model, prompt: str, n: int, **kw) -> str:
    out = generate_local(model, GenerateConfig(prompt=prompt, max_new_tokens=n, **kw))
    return bytes(out["tokens"][0]).decode("utf-8", "replace")


def test_completion_and_streaming_give_the_generate_text(server):
    port, model, _ = server
    body = {"prompt": "def f(", "max_tokens": 12, "temperature": 0}
    status, _, text = request(port, "POST", "/v1/completions", body)
    assert status == 200
    reply = json.loads(text)
    assert reply["choices"][0]["text"] == expected(model, "def f(", 12)
    assert reply["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}
    status, ctype, text = request(port, "POST", "/v1/completions", {**body, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [e[len("data: ") :] for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected(model, "def f(", 12)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) > 2
    sampled = {"prompt": "x", "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 4}
    got = json.loads(request(port, "POST", "/v1/completions", sampled)[2])["choices"][0]["text"]
    assert got == expected(model, "x", 8, temperature=0.8, top_p=0.9, seed=4)


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"max_tokens": 4}', 400, "prompt must be a non-empty string"),
        (b'{"prompt": "a", "max_tokens": 0}', 400, "max_tokens must be a number in [1, 32]"),
        (b'{"prompt": "a", "max_tokens": 33}', 400, "max_tokens must be a number in [1, 32]"),
        (b'{"prompt": "a", "temperature": -1}', 400, "temperature must be"),
        (b'{"prompt": "a", "top_p": 0}', 400, "top_p must be in (0, 1]"),
        (b'{"prompt": "a", "stream": "yes"}', 400, "stream must be true or false"),
        (b'{"prompt": "a", "n": 2}', 400, "n must be 1"),
        (b'{"prompt": "a", "model": "gpt-4"}', 404, "is not served here"),
        (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, "request body over"),
    ],
)
def test_bad_requests_get_a_4xx_and_the_server_goes_on(server, body, status, message):
    port, model, _ = server
    got, _, text = request(port, "POST", "/v1/completions", raw=body)
    assert got == status
    assert message in json.loads(text)["error"]["message"]
    assert request(port, "GET", "/health")[0] == 200


def test_wrong_method_and_path_and_health_and_metrics(server):
    port, _, _ = server
    assert request(port, "GET", "/v1/completions")[0] == 405
    assert request(port, "GET", "/v2/whatever")[0] == 404
    status, _, text = request(port, "GET", "/health")
    assert status == 200 and json.loads(text)["status"] == "ok"
    status, _, text = request(port, "GET", "/metrics")
    assert (
        status == 200
        and "lowband_requests_total" in text
        and "lowband_tokens_generated_total" in text
    )


def test_concurrent_clients_all_get_their_own_completion(server):
    port, model, engine = server
    before = engine.metrics.tokens
    prompts = [f"def f{i}(" for i in range(8)]

    def client(p: str) -> tuple[int, str]:
        status, _, text = request(
            port, "POST", "/v1/completions", {"prompt": p, "max_tokens": 6, "temperature": 0}
        )
        return status, json.loads(text)["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, prompts))
    assert [s for s, _ in results] == [200] * 8
    assert [t for _, t in results] == [expected(model, p, 6) for p in prompts]
    assert engine.metrics.tokens - before == 8 * 6


def test_a_client_that_leaves_mid_stream_does_not_hurt_the_server(server):
    port, model, engine = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"prompt": "a", "max_tokens": 32, "stream": True, "temperature": 0})
    conn.request("POST", "/v1/completions", body=body)
    conn.getresponse().fp.readline()  # the first event has started
    conn.sock.close()  # gone mid-stream: the engine stops it at the next token, or finishes
    conn.close()
    status, _, text = request(
        port, "POST", "/v1/completions", {"prompt": "b", "max_tokens": 5, "temperature": 0}
    )
    assert status == 200 and json.loads(text)["choices"][0]["text"] == expected(model, "b", 5)
    assert engine.metrics.failed == 0


def test_a_full_queue_is_a_503_and_the_engine_goes_on():
    from lowband.serve.http import BadRequest, Engine

    engine = Engine(build_model("1m", seed=0).eval(), queue_size=1)
    release, started = threading.Event(), threading.Event()

    def slow(_token: int) -> None:
        started.set()
        release.wait(30)

    cfg = GenerateConfig(prompt="a", max_new_tokens=2)
    busy = engine.submit(cfg, slow, threading.Event())
    assert started.wait(30)  # the engine thread is inside the first request
    waiting = engine.submit(cfg, lambda t: None, threading.Event())  # fills the queue of 1
    with pytest.raises(BadRequest) as e:
        engine.submit(cfg, lambda t: None, threading.Event())
    assert e.value.status == 503 and "busy" in str(e.value)
    release.set()
    assert len(busy.result(30)["tokens"][0]) == 2 and len(waiting.result(30)["tokens"][0]) == 2
    engine.close()


def test_serve_cli_bad_input_is_one_line_and_exit_2(capsys, server):
    from lowband.cli import main

    port = server[0]  # taken by the fixture's server
    for argv, message in [
        (["--model", "7b"], "unknown model '7b'"),
        (["--port", "70000"], "--port must be at most 65535"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
    ]:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_queued_requests_run_as_one_batch_with_each_ones_own_tokens():
    from lowband.serve.http import Engine

    model = build_model("1m", seed=3).eval().requires_grad_(False)
    model.output.weight.mul_(30.0)
    engine = Engine(model, queue_size=8, max_batch=8)
    release, started = threading.Event(), threading.Event()

    def slow(_token: int) -> None:
        started.set()
        release.wait(30)

    engine.submit(GenerateConfig(prompt="a", max_new_tokens=1), slow, threading.Event())
    assert started.wait(30)
    cfgs = [  # different lengths, budgets and samplers in one batch
        GenerateConfig(prompt="def main(argv):", max_new_tokens=9),
        GenerateConfig(prompt="x", max_new_tokens=4, temperature=0.8, top_p=0.9, seed=2),
        GenerateConfig(prompt="import os, sys", max_new_tokens=12, temperature=1.0, seed=5),
        GenerateConfig(prompt="é", max_new_tokens=6),
    ]
    futures = [engine.submit(c, lambda t: None, threading.Event()) for c in cfgs]
    release.set()
    got = [f.result(30)["tokens"][0] for f in futures]
    assert engine.metrics.batches == 2  # the blocking request, then the four together
    assert got == [generate_local(model, c)["tokens"][0] for c in cfgs]
    engine.close()
