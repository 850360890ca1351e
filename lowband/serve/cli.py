"""`lowband generate`: its parser (flags from GenerateConfig) and command."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from lowband.serve.config import GenerateConfig, ServeConfig, resolve_model


def cmd_generate(args: argparse.Namespace) -> int:
    from lowband.serve.worker import generate

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(GenerateConfig)
        if hasattr(args, f.name)
    }
    cfg = resolve_model(GenerateConfig(**given), "model" in given)
    (r,) = generate(cfg)
    ms = lambda s: "-" if s is None else f"{s * 1e3:.1f} ms"  # noqa: E731
    mode = cfg.parallel if cfg.parallel != "tp" else f"tp/{cfg.allreduce}"
    print(
        f"{cfg.model} {mode} x{cfg.workers} link {cfg.link or (cfg.link_map and 'map ' + cfg.link_map) or 'none'}: {len(r['tokens'][0])} tokens, "
        f"TTFT {ms(r['ttft_s'])}, TBT {ms(r['tbt_mean_s'])} (p50 {ms(r['tbt_p50_s'])}, "
        f"max {ms(r['tbt_max_s'])}), {r['tokens_per_s']:.1f} tokens/s, "
        f"bytes sent per worker {r['bytes_sent_by_worker']}",
        file=sys.stderr,
    )
    if "requests" in r and len(r["requests"]) > 1:
        print(
            f"{len(r['requests'])} requests: TTFT p50 {ms(r['ttft_p50_s'])}, p90 "
            f"{ms(r['ttft_p90_s'])}; TBT p50 {ms(r['tbt_p50_s'])}, p90 {ms(r['tbt_p90_s'])}; "
            f"{r['tokens_per_s']:.1f} tokens/s over all requests (the line above: request 0's "
            "tokens; TTFT: mean over requests; TBT: over all of them)",
            file=sys.stderr,
        )
    if "memory" in r:
        m, mb = r["memory"], 2**20
        print(
            f"memory (worker 0): peak {m['peak_bytes'] / mb:.2f} MB of a {m['budget_bytes'] / mb:.2f} MB "
            f"budget: {m['resident_bytes'] / mb:.2f} MB resident + at most {m['window']} layers of "
            f"{m['layer_bytes'] / mb:.2f} MB ({m['layer_loads']} layer loads from disk)",
            file=sys.stderr,
        )
    return 0


def add_generate_parser(sub, add_config_flags) -> None:
    g = sub.add_parser(
        "generate",
        help="generate text with a KV cache, on one process or split over workers",
        description="Generate from a prompt: greedy, temperature or top-p sampling, streamed to "
        "stdout; TTFT, TBT and tokens/s on stderr. --parallel tp|pp splits the model over "
        "--workers local processes behind an emulated --link (docs/inference.md).",
    )
    add_config_flags(g, GenerateConfig)
    g.set_defaults(fn=cmd_generate)


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from lowband.errors import ConfigError
    from lowband.models import PRESETS
    from lowband.serve.config import validate_serve
    from lowband.serve.engine import load_model

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ServeConfig)
        if hasattr(args, f.name)
    }
    cfg = ServeConfig(**given)
    gen = resolve_model(
        GenerateConfig(model=cfg.model, init=cfg.init, seed=cfg.seed, dtype=cfg.dtype),
        "model" in given,
    )
    cfg = dataclasses.replace(cfg, model=gen.model)
    validate_serve(cfg)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError(
            "lowband serve needs starlette and uvicorn (pip install 'lowband[serve]')"
        ) from None
    from lowband.serve.http import bind, make_server

    max_seq_len = PRESETS[cfg.model].max_seq_len if cfg.model in PRESETS else 4096
    try:
        sock = bind(cfg.host, cfg.port)
    except OSError as e:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
    host, port = sock.getsockname()[:2]
    mode = "" if cfg.parallel == "none" else f" --parallel {cfg.parallel} x{cfg.workers}"
    print(
        f"lowband serve: {cfg.model}{mode} on http://{host}:{port}/v1/completions",
        file=sys.stderr,
        flush=True,
    )
    if cfg.parallel != "none":  # worker 0 serves, the others follow (lowband.serve.distributed)
        from lowband.serve.distributed import serve_parallel

        serve_parallel(cfg, sock, max_seq_len)
        print("lowband serve: stopped", file=sys.stderr)
        return 0
    torch.set_num_threads(cfg.threads)
    model = load_model(gen, cfg.device)
    server, sock, engine = make_server(cfg, model, max_seq_len, sock=sock)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM through lowband.launch.signals
        print(f"lowband serve: stopped ({e or 'interrupted'})", file=sys.stderr)
    finally:
        engine.close()
    return 0


def add_serve_parser(sub, add_config_flags) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a model over HTTP: POST /v1/completions (SSE streaming), /health, /metrics",
        description="An HTTP completions endpoint for a preset or hf: model (--init RUN for a "
        "training run's weights); requests queued while the model is busy are decoded together "
        "as one batch; --parallel tp|pp|lamina|splitwise --workers N splits the model over N local processes "
        "behind an emulated --link, worker 0 serving (docs/inference.md).",
    )
    add_config_flags(s, ServeConfig)
    s.set_defaults(fn=cmd_serve)
