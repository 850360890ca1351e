"""GenerateConfig: everything that decides what `lowband generate` computes, and its checks.

The CLI flags come from the fields (lowband.cli.add_config_flags); `validate_generate` refuses
every impossible combination in one place, before any worker starts (docs/inference.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lowband.config import BIG, check_ranges
from lowband.errors import ConfigError

PARALLEL_MODES = ("none", "tp", "pp", "lamina", "splitwise", "colocated")
STREAM_MODES = ("pp", "splitwise", "colocated")  # modes that serve --requests N > 1
ALLREDUCE = ("ring", "star", "tree")


@dataclass(kw_only=True)
class GenerateConfig:
    """What `lowband generate` runs."""

    model: str = "1m"
    """Model: a preset (1m, 10m, 125m, 350m, 1b) or hf:llama-tiny / hf:llama-1m (transformers, built offline). Default weights are drawn from --seed; --init loads a run's."""
    init: str | None = None
    """Weights from this lowband run folder (its latest checkpoint), checkpoint folder or file; its model preset is used unless --model names the same one."""
    prompt: str = "def "
    """Prompt text; its UTF-8 bytes are the tokens (byte-level vocabulary)."""
    max_new_tokens: int = 64
    """Tokens to generate after the prompt."""
    temperature: float = 0.0
    """0: greedy (argmax); > 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p (1: all). Needs --temperature > 0 to matter."""
    seed: int = 0
    """Seed of the sampler (and of the weights when there is no --init)."""
    parallel: str = "none"
    """none (one process), tp (attention heads and FFN columns split over --workers; TPI-LLM), pp (layers split into --workers stages), lamina (worker 0 computes, the others hold the KV cache and run attention; Lamina), splitwise (a prefill pool of --prefill-workers runs the prompts and ships each KV cache layer by layer to a decode pool of the others; Splitwise) or colocated (every worker prefills and decodes its own requests: splitwise's baseline)."""
    allreduce: str = "ring"
    """--parallel tp's all-reduce: ring (2(W-1) latency hops), star (2 hops through worker 0; TPI-LLM) or tree (recursive doubling, log2 W hops; W a power of two)."""
    workers: int = 1
    """Worker processes (Gloo on CPU, --threads threads each)."""
    link: str | None = None
    """Emulated link between workers, BANDWIDTH:LATENCY[:JITTER][:LOSS%], as for `lowband train`."""
    link_map: str | None = None
    """A JSON file with a link per pair of workers (lowband.comm.LinkMap: default, sites with intra/inter links, named pairs); excludes --link."""
    requests: int = 1
    """Requests to serve (> 1: request i's prompt is --prompt repeated 1 + i mod 3 times then '#i', its sampler seeded --seed + i). With --parallel pp, splitwise or colocated."""
    micro_batches: int = 0
    """--parallel pp with --requests > 1: micro-batches kept in flight through the stages (requests dealt round-robin into them, each a left-padded batch); 0: one per request."""
    arrival_rate: float = 0.0
    """Requests per second arriving (a Poisson process seeded by --seed), for splitwise and colocated; 0: all at once."""
    prefill_workers: int = 1
    """--parallel splitwise: workers in the prefill pool (the last ones); the others decode."""
    device: str = "cpu"
    """cpu, cuda, or auto (one GPU per worker when there are enough GPUs, else CPU)."""
    dtype: str = "fp32"
    """fp32 or bf16: the weights, the KV cache and what travels between workers (bf16 halves the bytes; fp32 gives every parallel mode the single-process tokens exactly)."""
    threads: int = 1
    """CPU threads per worker process."""
    memory_budget: float | None = None
    """MB of weights, KV cache and head a worker may hold: its layers are written to disk once and streamed back through a sliding window, the next layers read while the current one computes (TPI-LLM). With --parallel none or tp."""
    quiet: bool = False
    """Do not stream the generated text to stdout (the timings are still printed)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GenerateConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


DTYPES = ("fp32", "bf16")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")


GENERATE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "max_new_tokens": (1, BIG), "temperature": (0.0, 1e6), "top_p": (1e-9, 1.0),
    "seed": (0, 2**63 - 1), "workers": (1, 4096), "threads": (1, 1024),
    "memory_budget": (1e-6, 1e9), "requests": (1, 10**6), "micro_batches": (0, 10**6),
    "arrival_rate": (0.0, 1e9), "prefill_workers": (1, 4096),
}  # fmt: skip


def resolve_model(cfg: GenerateConfig, model_given: bool) -> GenerateConfig:
    """cfg with --model taken from --init's run when not given; ConfigError when they disagree."""
    if cfg.init is None:
        return cfg
    from lowband.zo.models import resolve_init

    found = resolve_init(cfg.init)
    if found.model is None:
        return cfg
    if model_given and cfg.model != found.model:
        raise ConfigError(
            f"--init {cfg.init} holds a {found.model!r} model, --model is {cfg.model!r}"
        )
    return dataclasses.replace(cfg, model=found.model)


def check_tp_split(n_heads: int, n_kv_heads: int, ffn_dim: int, workers: int) -> None:
    """ConfigError unless heads, kv heads and FFN columns split over `workers` (docs/inference.md)."""
    if n_heads % workers:
        raise ConfigError(
            f"--parallel tp: --workers {workers} does not divide the model's {n_heads} attention heads"
        )
    if n_kv_heads % workers and workers % n_kv_heads:
        raise ConfigError(
            f"--parallel tp: --workers {workers} and the model's {n_kv_heads} kv heads must divide "
            "one another (each worker owns whole kv heads, or W/K workers share one)"
        )
    if ffn_dim % workers:
        raise ConfigError(
            f"--parallel tp: --workers {workers} does not divide the model's FFN width {ffn_dim}"
        )


def validate_generate(cfg: GenerateConfig) -> None:
    """Everything that can be checked before a worker starts. Raises ConfigError (one line)."""
    from lowband.models import PRESETS
    from lowband.zo.models import check_model_name

    check_ranges(cfg, GENERATE_RANGES)
    check_model_name(cfg.model)
    if not cfg.prompt:
        raise ConfigError("--prompt must not be empty")
    if cfg.parallel not in PARALLEL_MODES:
        raise ConfigError(
            f"unknown --parallel {cfg.parallel!r}; choose one of: {', '.join(PARALLEL_MODES)}"
        )
    if cfg.allreduce not in ALLREDUCE:
        raise ConfigError(
            f"unknown --allreduce {cfg.allreduce!r}; choose one of: {', '.join(ALLREDUCE)}"
        )
    if cfg.device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"unknown --device {cfg.device!r}; choose cpu, cuda or auto")
    check_dtype(cfg.dtype)
    if cfg.parallel == "none" and cfg.workers > 1:
        raise ConfigError(f"--workers {cfg.workers} needs --parallel tp or pp")
    if cfg.requests > 1 and cfg.parallel not in STREAM_MODES:
        raise ConfigError(
            f"--requests {cfg.requests} runs with --parallel {', '.join(STREAM_MODES)}; "
            f"--parallel {cfg.parallel} serves one request"
        )
    if cfg.micro_batches and (cfg.parallel != "pp" or cfg.micro_batches > cfg.requests):
        raise ConfigError(
            f"--micro-batches {cfg.micro_batches} needs --parallel pp and at most --requests "
            f"({cfg.requests}) micro-batches"
        )
    if cfg.arrival_rate and cfg.parallel not in ("splitwise", "colocated"):
        raise ConfigError("--arrival-rate needs --parallel splitwise or colocated")
    if cfg.prefill_workers != 1 and cfg.parallel != "splitwise":
        raise ConfigError("--prefill-workers needs --parallel splitwise")
    if cfg.parallel != "none" and cfg.model.startswith("hf:"):
        raise ConfigError(
            f"--parallel {cfg.parallel} runs lowband presets; {cfg.model} runs in one process"
        )
    from lowband.comm.link import resolve_link

    link = resolve_link(cfg.link, cfg.link_map)
    if cfg.link_map:
        link.check(cfg.workers)
    if cfg.memory_budget is not None and (
        cfg.parallel in ("pp", "lamina", "splitwise", "colocated") or cfg.model.startswith("hf:")
    ):
        raise ConfigError(
            "--memory-budget streams the layers of a preset with --parallel none or tp"
        )
    if cfg.model.startswith("hf:"):
        return
    shape = PRESETS[cfg.model]
    from lowband.serve.requests import request_prompt

    longest = max(
        len(request_prompt(cfg.prompt, i, cfg.requests).encode("utf-8"))
        for i in range(cfg.requests)
    )
    total = longest + cfg.max_new_tokens
    if total > shape.max_seq_len:
        raise ConfigError(
            f"prompt ({longest} bytes) + --max-new-tokens {cfg.max_new_tokens} "
            f"exceeds the model's {shape.max_seq_len} positions"
        )
    if cfg.parallel == "tp":
        check_tp_split(shape.n_heads, shape.n_kv_heads, shape.ffn_dim, cfg.workers)
        if cfg.allreduce == "tree" and cfg.workers & (cfg.workers - 1):
            raise ConfigError(f"--allreduce tree needs a power-of-two --workers, got {cfg.workers}")
    if cfg.parallel == "splitwise":
        from lowband.serve.splitwise import check_splitwise

        check_splitwise(cfg.workers, cfg.prefill_workers)
    if cfg.parallel == "lamina":
        from lowband.serve.lamina import check_lamina_split

        check_lamina_split(shape, cfg.workers)
    if cfg.parallel == "pp" and cfg.workers > shape.n_layers:
        raise ConfigError(
            f"--parallel pp: --workers {cfg.workers} stages for the model's {shape.n_layers} layers"
        )


@dataclass(kw_only=True)
class ServeConfig:
    """What `lowband serve` runs: one model behind an HTTP completions endpoint."""

    model: str = "1m"
    """Model, as for `lowband generate`."""
    init: str | None = None
    """Weights from this lowband run folder, checkpoint folder or file, as for `lowband generate`."""
    seed: int = 0
    """Seed of the weights when there is no --init (each request brings its own sampling seed)."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """Port to listen on (0: any free port, printed at start)."""
    max_tokens: int = 256
    """The most tokens one request may ask for (max_tokens in its body)."""
    queue: int = 64
    """Requests waiting for the model at most; one more gets 503."""
    max_batch: int = 8
    """Requests decoded together at most: those queued when the model is free form one batch."""
    device: str = "cpu"
    """cpu or cuda."""
    dtype: str = "fp32"
    """fp32 or bf16: the weights and the KV cache."""
    threads: int = 1
    """CPU threads of the model (of each worker)."""
    parallel: str = "none"
    """none (one process), tp, pp, lamina or splitwise: the model split over --workers local processes as for `lowband generate`; worker 0 runs the HTTP server and sends each batch to the others (lowband.serve.distributed). lamina: worker 0 computes, the others hold the KV cache, a batch's requests one after another. splitwise: worker 0 decodes, the others prefill."""
    workers: int = 1
    """Worker processes with --parallel tp, pp, lamina or splitwise."""
    allreduce: str = "ring"
    """--parallel tp's all-reduce: ring, star or tree, as for `lowband generate`."""
    link: str | None = None
    """Emulated link between workers, BANDWIDTH:LATENCY[:JITTER][:LOSS%], as for `lowband generate`."""
    link_map: str | None = None
    """A JSON file with a link per pair of workers, as for `lowband generate`; excludes --link."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ServeConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


SERVE_MODES = ("none", "tp", "pp", "lamina", "splitwise")  # colocated: `lowband generate` only

SERVE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "seed": (0, 2**63 - 1), "port": (0, 65535), "max_tokens": (1, 4096), "queue": (1, 10**6), "max_batch": (1, 1024),
    "threads": (1, 1024), "workers": (1, 4096),
}  # fmt: skip


def validate_serve(cfg: ServeConfig) -> None:
    from lowband.zo.models import check_model_name

    check_ranges(cfg, SERVE_RANGES)
    check_model_name(cfg.model)
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown --device {cfg.device!r}; choose cpu or cuda")
    check_dtype(cfg.dtype)
    if cfg.parallel in PARALLEL_MODES and cfg.parallel not in SERVE_MODES:
        raise ConfigError(
            f"lowband serve runs --parallel {', '.join(SERVE_MODES)}; --parallel {cfg.parallel} "
            "is for lowband generate only (docs/inference.md)"
        )
    # everything else as `lowband generate` checks it: mode, workers, head split, stages, link
    validate_generate(
        GenerateConfig(
            model=cfg.model, max_new_tokens=1, parallel=cfg.parallel, allreduce=cfg.allreduce,
            workers=cfg.workers, link=cfg.link, link_map=cfg.link_map, device=cfg.device,
            dtype=cfg.dtype, threads=cfg.threads,
        )
    )  # fmt: skip
