"""`lowband serve`: an HTTP completions endpoint (the common `POST /v1/completions` shape, with
server-sent events when `stream` is true), `GET /health` and `GET /metrics`. Starlette + uvicorn.

How a request flows:
    1. the handler parses and checks the body (`parse_request`): anything wrong is a 4xx with a
       one-line message, before the model sees it;
    2. it queues the request for the engine thread (a full queue is a 503) and awaits its tokens;
    3. the engine thread takes every request queued by the time it is free, up to --max-batch,
       and runs them as one batch (lowband.serve.engine.generate_batch: prompts left-padded, one
       forward per step, a seeded sampler per request); each token goes back to the event loop
       through call_soon_threadsafe;
    4. a client that goes away cancels its request: the engine stops it at the next token.
Errors inside one request fail that request (500, counted) and never the server.

With --parallel tp, pp, lamina or splitwise the engine hands each batch to a runner
(lowband.serve.distributed) that sends it to the other workers and decodes it with them in
lockstep. There a failure is the
whole server's: the request gets 503, later ones too, and the server stops (step 5 there).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowband.serve.config import GenerateConfig
from lowband.serve.engine import Cancelled, generate_batch, generate_local

MAX_BODY = 1 << 20  # bytes of one request body


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_request(
    body: bytes, model_name: str, max_tokens: int, max_seq_len: int
) -> tuple[GenerateConfig, bool]:
    """The request's GenerateConfig and whether it streams; BadRequest (one line) otherwise."""
    if len(body) > MAX_BODY:
        raise BadRequest(f"request body over {MAX_BODY} bytes", 413)
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(req, dict):
        raise BadRequest("request body must be a JSON object")
    if "model" in req and req["model"] != model_name:
        raise BadRequest(
            f"model {req['model']!r} is not served here; this server has {model_name!r}", 404
        )
    prompt = req.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string")

    def number(name: str, default, kinds, lo, hi):
        v = req.get(name, default)
        if isinstance(v, bool) or not isinstance(v, kinds) or not lo <= v <= hi:
            raise BadRequest(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        return v

    n_tokens = number("max_tokens", 16, int, 1, max_tokens)
    temperature = number("temperature", 1.0, (int, float), 0.0, 100.0)
    top_p = number("top_p", 1.0, (int, float), 0.0, 1.0)
    if top_p == 0:
        raise BadRequest("top_p must be in (0, 1], got 0")
    seed = number("seed", 0, int, 0, 2**63 - 1)
    if req.get("n", 1) != 1:
        raise BadRequest("n must be 1 (one completion per request)")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {stream!r}")
    length = len(prompt.encode("utf-8")) + n_tokens
    if length > max_seq_len:
        raise BadRequest(
            f"prompt bytes + max_tokens = {length} exceeds the model's {max_seq_len} positions"
        )
    cfg = GenerateConfig(
        prompt=prompt, max_new_tokens=n_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed,
        quiet=True,
    )  # fmt: skip
    return cfg, stream


@dataclass
class Metrics:
    requests: int = 0
    rejected: dict[int, int] = field(default_factory=dict)
    failed: int = 0
    cancelled: int = 0
    batches: int = 0
    tokens: int = 0
    ttft_sum: float = 0.0
    tbt_sum: float = 0.0
    tbt_count: int = 0

    def text(self, queued: int) -> str:
        lines = [
            f"lowband_requests_total {self.requests}",
            f"lowband_requests_failed_total {self.failed}",
            f"lowband_requests_cancelled_total {self.cancelled}",
            f"lowband_batches_total {self.batches}",
            f"lowband_tokens_generated_total {self.tokens}",
            f"lowband_queue_length {queued}",
            f"lowband_ttft_seconds_sum {self.ttft_sum:.6f}",
            f"lowband_tbt_seconds_sum {self.tbt_sum:.6f}",
            f"lowband_tbt_seconds_count {self.tbt_count}",
        ]
        lines += [
            f'lowband_requests_rejected_total{{status="{s}"}} {n}'
            for s, n in sorted(self.rejected.items())
        ]
        return "\n".join(lines) + "\n"


KEEPALIVE_S = 60.0
"""An idle parallel server pings its workers this often: they wait in a collective, which gives
up after lowband.launch.local.TIMEOUT (10 minutes)."""


class Engine:
    """One thread that runs the queued requests on `model` in batches of up to `max_batch`
    (step 3; lowband.serve.engine.generate_batch), or through `runner` (the parallel modes:
    lowband.serve.distributed.Runner; `on_broken()` is called once if it fails)."""

    def __init__(
        self,
        model: nn.Module | None,
        queue_size: int,
        max_batch: int = 8,
        runner=None,
        on_broken: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.metrics, self.max_batch = model, Metrics(), max_batch
        self.runner, self.on_broken = runner, on_broken
        self.broken: str | None = None  # why the parallel workers can no longer serve
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lowband-engine", daemon=True)
        self._thread.start()

    def queued(self) -> int:
        return self._queue.qsize()

    def submit(
        self, cfg: GenerateConfig, on_token: Callable[[int], None], cancel: threading.Event
    ) -> Future:
        fut: Future = Future()
        if self.broken is not None:
            raise BadRequest(self.broken, 503)
        try:
            self._queue.put_nowait((cfg, on_token, cancel, fut))
        except queue.Full:
            raise BadRequest(
                "the server is busy: too many queued requests; retry later", 503
            ) from None
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self.runner is not None and self.broken is None:
                self.runner.close()  # the workers leave their loop
            while True:  # requests queued after a failure: 503
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[-1].set_exception(BadRequest(self.broken or "the server is stopping", 503))

    def _loop(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=KEEPALIVE_S if self.runner else None)
            except queue.Empty:
                try:
                    self.runner.keepalive()
                except Exception as e:  # noqa: BLE001 - a lost worker
                    self._break(e)
                    return
                continue
            if job is None:
                return
            jobs = [job]  # step 3: everything queued meanwhile joins this batch
            while len(jobs) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # close() after this batch
                    break
                jobs.append(more)
            self._run_batch(jobs)
            if self.broken is not None:
                return

    def _break(self, e: Exception) -> None:
        self.broken = (
            f"a worker failed ({type(e).__name__}: {e}".splitlines()[0][:300]
            + "); the server is stopping"
        )
        if self.on_broken is not None:
            self.on_broken()

    def _run_batch(self, jobs: list) -> None:
        def callback(on_token, cancel):
            def token(t: int) -> None:
                if cancel.is_set():
                    if self.runner is not None:  # the workers decode in lockstep: finish the row
                        return
                    raise Cancelled
                on_token(t)

            return token

        cfgs = [cfg for cfg, *_ in jobs]
        calls = [callback(on_token, cancel) for _, on_token, cancel, _ in jobs]
        try:
            if self.runner is not None:
                outs = self.runner(cfgs, calls)
            elif hasattr(self.model, "forward_cached"):
                outs = generate_batch(self.model, cfgs, calls)
            else:  # hf: models, one request at a time with their own cache
                outs = []
                for cfg, call in zip(cfgs, calls, strict=True):
                    try:
                        outs.append(generate_local(self.model, cfg, call))
                    except Cancelled as e:
                        outs.append(e)
        except Exception as e:  # noqa: BLE001 - the batch fails, the server goes on
            outs = [e] * len(jobs)
            if self.runner is not None:  # the workers are out of step or gone: stop serving
                self._break(e)
                outs = [BadRequest(self.broken, 503)] * len(jobs)
        with self._lock:
            m = self.metrics
            m.batches += 1
            for out in outs:
                if isinstance(out, Cancelled):
                    m.cancelled += 1
                elif isinstance(out, Exception):
                    m.failed += 1
                else:
                    n = len(out["tokens"][0])
                    m.tokens += n
                    m.ttft_sum += out["ttft_s"]
                    if out["tbt_mean_s"] is not None:
                        m.tbt_sum += out["tbt_mean_s"] * (n - 1)
                        m.tbt_count += n - 1
        for (*_, fut), out in zip(jobs, outs, strict=True):
            if isinstance(out, Exception):
                fut.set_exception(out)
            else:
                fut.set_result(out)


def _completion(
    rid: str, model: str, text: str, finish: str | None, usage: dict | None = None
) -> dict[str, Any]:
    body = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
    }  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return body


def build_app(engine: Engine, model_name: str, max_tokens: int, max_seq_len: int):
    """The Starlette application (steps 1, 2 and 4)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    def error(status: int, message: str) -> JSONResponse:
        engine.metrics.rejected[status] = engine.metrics.rejected.get(status, 0) + 1
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    async def health(_: Request):
        return JSONResponse({"status": "ok", "model": model_name, "queued": engine.queued()})

    async def metrics(_: Request):
        return PlainTextResponse(engine.metrics.text(engine.queued()))

    async def completions(request: Request):
        engine.metrics.requests += 1
        if (
            request.headers.get("content-length", "0").isdigit()
            and int(request.headers.get("content-length", "0")) > MAX_BODY
        ):
            return error(413, f"request body over {MAX_BODY} bytes")
        try:
            cfg, stream = parse_request(await request.body(), model_name, max_tokens, max_seq_len)
        except BadRequest as e:
            return error(e.status, str(e))
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        try:
            fut = engine.submit(
                cfg, lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t), cancel
            )
        except BadRequest as e:
            return error(e.status, str(e))
        fut.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, None))
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        usage = {
            "prompt_tokens": len(cfg.prompt.encode("utf-8")), "completion_tokens": cfg.max_new_tokens,
            "total_tokens": len(cfg.prompt.encode("utf-8")) + cfg.max_new_tokens,
        }  # fmt: skip
        if not stream:
            try:
                out = await asyncio.wrap_future(fut)
            except asyncio.CancelledError:
                cancel.set()
                raise
            except BadRequest as e:  # a parallel worker failed: 503
                return error(e.status, str(e))
            except Exception as e:  # noqa: BLE001
                return error(500, f"generation failed: {type(e).__name__}: {e}".splitlines()[0])
            text = bytes(out["tokens"][0]).decode("utf-8", "replace")
            return JSONResponse(_completion(rid, model_name, text, "length", usage))

        async def events():
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                while (t := await tokens.get()) is not None:
                    if piece := decoder.decode(bytes([t])):
                        yield f"data: {json.dumps(_completion(rid, model_name, piece, None))}\n\n"
                if (exc := fut.exception()) is not None:
                    msg = (
                        str(exc)
                        if isinstance(exc, BadRequest)
                        else f"generation failed: {type(exc).__name__}"
                    )
                    yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error'}})}\n\n"
                    return
                last = _completion(
                    rid, model_name, decoder.decode(b"", final=True), "length", usage
                )
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # a client that left: stop at the next token (no-op when done)

        return StreamingResponse(events(), media_type="text/event-stream")

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]

    async def http_error(request: Request, exc):  # 404, 405: the same JSON error shape
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    from starlette.exceptions import HTTPException

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def bind(host: str, port: int):
    """A listening TCP socket on (host, port); OSError when it cannot be had."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # clients that come while the workers load wait in the backlog
    return sock


def make_server(cfg, model: nn.Module | None, max_seq_len: int, runner=None, sock=None):
    """(uvicorn.Server, its bound socket, the Engine) for ServeConfig `cfg`; run with
    `server.run(sockets=[sock])`; `server.should_exit = True` stops it. With `runner` (the
    parallel modes) batches go through it, and a failed runner stops the server."""
    import uvicorn

    server: list = []
    engine = Engine(
        model, cfg.queue, cfg.max_batch, runner,
        on_broken=lambda: setattr(server[0], "should_exit", True) if server else None,
    )  # fmt: skip
    app = build_app(engine, cfg.model, cfg.max_tokens, max_seq_len)
    sock = sock if sock is not None else bind(cfg.host, cfg.port)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server.append(uvicorn.Server(config))
    return server[0], sock, engine
