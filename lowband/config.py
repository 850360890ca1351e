"""Configuration: one dataclass per component, a docstring under each field.

The CLI is generated from these dataclasses (lowband.cli): each field becomes a flag whose help
is the field's docstring, so documentation lives in exactly one place.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass, field

# Learning rates per model preset for AdamW on byte-level text (bigger models want smaller steps).
DEFAULT_LR = {"1m": 3e-3, "10m": 2e-3, "125m": 6e-4, "350m": 4e-4, "1b": 3e-4}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that decides what `lowband train` computes. Saved as config.json in the run folder."""

    # -- what to train --------------------------------------------------------------------------
    algo: str = "ddp"
    """Training algorithm: ddp (synchronous data parallel, the baseline), diloco, streaming-diloco, noloco, co2; federated: fedavg, fedprox, scaffold, scallion, scafcom, admm-nr; decentralized: dpsgd, dfedsam, dfedsam-mgs (lowband.algorithms; each has its options below)."""
    model: str = "1m"
    """Model preset of the Llama-style decoder: 1m, 10m, 125m, 350m, 1b (see `lowband models`)."""
    data: str = "stdlib"
    """Corpus: 'stdlib' (this Python's standard-library source, no download), a text file, a directory of text files, or pre-tokenised uint16 .bin files."""
    seed: int = 0
    """Seed of the model initialisation and of every worker's data order."""
    partition: str = "iid"
    """How the training documents are split across workers: iid (contiguous equal shards), by-source (whole top-level sources, e.g. stdlib packages, per worker) or dirichlet:ALPHA (per source, Dirichlet(ALPHA) proportions over workers); deterministic from --seed (docs/federated.md)."""

    # -- how long and how big -------------------------------------------------------------------
    steps: int = 300
    """Optimizer steps per worker."""
    tokens: int | None = None
    """Token budget over all workers; when set it decides the number of steps instead of --steps."""
    batch_size: int = 8
    """Sequences per worker per step."""
    seq_len: int = 128
    """Tokens per sequence."""

    # -- optimizer ------------------------------------------------------------------------------
    lr: float | None = None
    """Peak AdamW learning rate (default: chosen per model preset, 3e-3 for 1m)."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""
    warmup_steps: int | None = None
    """Linear warmup steps (default: 5% of the steps, at most 200)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine and linear)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0 turns clipping off)."""
    inner_optimizer: str = "adamw"
    """The optimizer of every worker's steps: adamw, or muon (Muon for the transformer blocks' weight matrices, its learning rate matched to AdamW's update size, and AdamW for the embeddings, head and norms, as MuLoCo pairs it with DiLoCo)."""

    # -- workers and network --------------------------------------------------------------------
    workers: int = 4
    """Local worker processes (Gloo on CPU, one thread each). Ignored under torchrun, which decides."""
    link: str | None = None
    """Emulated link between workers, BANDWIDTH:LATENCY[:JITTER][:LOSS%], e.g. 100mbit:50ms or 1gbit:20ms:2ms:0.1% (tc units: mbit = megabits/s, mbps = megabytes/s)."""
    link_map: str | None = None
    """A JSON file giving a link per pair of workers instead of one --link for all, e.g. {"sites": [[0,1],[2,3]], "intra": "10gbit:100us", "inter": "100mbit:80ms"} (docs/comm.md). Point-to-point messages take their pair's link, collectives their group's slowest."""
    device: str = "auto"
    """cpu, cuda, or auto (one GPU per worker when there are enough GPUs, else CPU)."""
    threads: int = 1
    """CPU threads per worker process."""

    # -- compute ---------------------------------------------------------------------------------
    compile: bool | None = None
    """Compile the model's forward and backward with torch.compile, block by block (--compile / --no-compile; default: on for CUDA, off on CPU, where the compile costs more than it saves on small models). Not with --seq-parallel, whose attention communicates."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping them: less memory for long sequences, about one more forward of compute."""

    # -- the algorithm's own options ------------------------------------------------------------
    options: dict = field(default_factory=dict)
    """The --algo's own options (e.g. sync_every, fragments, bits): each algorithm declares them in its Options dataclass (lowband.algorithms), which gives their flags, defaults and checks. A new run stores them resolved, defaults included."""

    # -- robust aggregation / gradient coding (#7) -----------------------------------------------
    aggregate: str = "mean"
    """How workers' updates are combined: mean (the all-reduce) or a Byzantine-robust rule over all-gathered updates (fp32, or --bits): median, trimmed-mean, krum, multi-krum, bulyan, geomed, centered-clipping, flag. ddp: gradients; diloco, streaming-diloco: pseudo-gradients."""
    byzantine_tolerance: int = 0
    """f, the Byzantine workers the --aggregate rule is set to tolerate (2f < workers; trimmed-mean drops f each side, krum needs workers > 2f + 2, bulyan workers >= 4f + 3)."""
    krum_neighbours: str = "paper"
    """Krum and Multi-Krum: the neighbours a score sums over: paper (n - f - 2, Blanchard et al.) or byzfl (n - f - 1, byzfl's convention); docs/robust_and_coding.md measures the difference."""
    attack: str | None = None
    """Testing aid: the last --attackers ranks misbehave: sign-flip, ipm, alie, gaussian, random, nan, inf (their update is replaced; they see the honest updates) or label-flip (they train on flipped targets)."""
    attackers: int = 0
    """Testing aid: how many workers run --attack (which ones: --attackers-at)."""
    attackers_at: str = "last"
    """Testing aid: which workers run --attack: last (the last --attackers, so rank 0 stays honest), first, or random (drawn from --seed). Robust rules that break ties by position would otherwise favour one placement."""
    stragglers: int = 0
    """DDP gradient coding: tolerate s stragglers. Every worker computes the gradients of s + 1 data parts (s + 1 times the compute) and each step finishes on the first workers - s arrivals, with the exact average."""
    gradient_code: str | None = None
    """Code for --stragglers: fr (fractional repetition, needs s + 1 to divide --workers) or cyclic (cyclic MDS, any s); default fr where it fits, else cyclic."""
    slow_workers: int | None = None
    """Testing aid (ddp): workers made slow every step, drawn from --seed and the step (default: --stragglers)."""
    straggler_delay: float = 0.0
    """Testing aid (ddp): seconds a slow worker is late every step; 0 injects none. Without --stragglers everybody waits for it."""

    # -- sequence parallelism (#6) -------------------------------------------------------------
    seq_parallel: str | None = None
    """Shard every sequence over --cp ranks and run attention across them: ulysses, ring (zigzag), tokenring, or hybrid (Ulysses inside x ring across). Needs --algo ddp; see docs/seqpar.md."""
    cp: int = 1
    """Context-parallel degree: consecutive ranks sharing each sequence; data parallel runs across the --workers/--cp groups."""
    cp_ulysses: int | None = None
    """Hybrid: Ulysses degree inside each cp group (default 2); the ring runs across --cp/--cp-ulysses."""

    # -- evaluation, logging, checkpoints -------------------------------------------------------
    eval_every: int = 50
    """Evaluate the held-out split every this many steps (and at the last step)."""
    eval_batches: int = 8
    """Batches of the held-out split per evaluation."""
    log_every: int = 5
    """Write a metrics line every this many steps (and at every evaluation)."""
    ckpt_every: int = 100
    """Checkpoint every this many steps (and at the last step); 0 checkpoints only at the end, -1 never (benchmarks)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""

    # -- elastic training (#4) -------------------------------------------------------------------
    elastic: bool = False
    """Elastic training on torchft (every --algo): workers may die, hang or join without stopping the others (docs/elastic.md)."""
    min_workers: int = 1
    """Elastic: the fewest live workers a synchronisation may commit with (torchft's min_replica_size)."""
    restarts: int = 0
    """Elastic, local launch: restart a worker that died, up to this many times in all; it rejoins with a live peer's state."""
    lighthouse: str | None = None
    """Elastic: address of a running torchft Lighthouse (http://HOST:PORT); default: start one in this command."""
    timeout: float = 60.0
    """Elastic: seconds before a collective or a state transfer is given up (a hung peer is dropped after this)."""
    quorum_timeout: float = 600.0
    """Elastic: seconds a worker waits for a quorum (longer than the time between synchronisations)."""
    heartbeat_timeout: float = 5.0
    """Elastic: a worker silent for this many seconds is left out of the next quorum."""
    join_timeout: float = 60.0
    """Elastic: seconds a quorum waits for live (heartbeating) workers that have not asked yet."""
    parity_every: int = 1
    """Elastic: check bit-parity of the shared state every this many committed synchronisations (0 never)."""
    detect_every: int = 10
    """Elastic: exchange collective timings and flag slow ranks every this many synchronisations (0 never)."""

    # -- testing aids ---------------------------------------------------------------------------
    fail_at: str | None = None
    """Fault injection: RANK:STEP[,RANK:STEP...] kills that worker (SIGKILL, as kill -9) right after that step."""
    stall_at: str | None = None
    """Fault injection: RANK:STEP:SECONDS stops that worker (SIGSTOP) for that long after that step, then SIGCONT."""
    throttle_at: str | None = None
    """Fault injection: RANK:STEP:FACTOR divides that worker's emulated link bandwidth by FACTOR from that step on."""
    kill_joiner: str | None = None
    """Fault injection (elastic): SECONDS[,SECONDS...]: a restarted worker kills itself (SIGKILL) that long after it joined, while it waits for its quorum or heals; one value per restart (the first restart takes the first), later restarts are left alone."""

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.model, 1e-3)

    def resolved_warmup(self, steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(200, max(1, steps // 20))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From config.json. A run saved before the algorithms declared their own options kept
        them as top-level keys (None for a default): those move into `options`."""
        from lowband.algorithms.registry import discover, option_fields

        discover()
        names = {f.name for f in dataclasses.fields(cls)}
        known = option_fields()
        options = dict(d.get("options") or {})
        for k, v in d.items():
            if k not in names and k in known and v is not None and k not in options:
                options[k] = v
        return cls(**{k: v for k, v in d.items() if k in names and k != "options"}, options=options)


# -- zeroth-order fine-tuning (`lowband finetune`, lowband.zo; docs/zo.md) ----------------------


@dataclass(kw_only=True)
class FinetuneConfig:
    """Everything that decides what `lowband finetune` computes. Saved as config.json in the run folder."""

    init: str | None = None
    """Start from this lowband run folder (its latest checkpoint), checkpoint folder (RUN/ckpt/step_N) or checkpoint file; its model preset is used unless --model names the same one. Default: a fresh model from --seed."""
    model: str = "1m"
    """Model: a preset (1m, 10m, 125m, 350m, 1b) or a Hugging Face causal LM built offline from a config when transformers is installed: hf:llama-tiny, hf:llama-1m."""
    data: str = "stdlib"
    """Corpus, as for `lowband train`."""
    seed: int = 0
    """Seed of the perturbations (shared by all workers), of a fresh model and of the data order."""
    steps: int = 300
    """ZO steps (every worker applies every step's updates)."""
    batch_size: int = 8
    """Sequences per batch (one batch per worker, or per pair with --perturb-parallel)."""
    seq_len: int = 128
    """Tokens per sequence."""
    lr: float = 3e-4
    """Learning rate of the ZO-SGD step theta -= lr (mean_k g_k z_k + wd theta); constant. The default suits the 1m preset (benchmarks/RESULTS.md); larger models want less."""
    eps: float = 1e-3
    """Perturbation scale: losses at theta +- eps z."""
    weight_decay: float = 0.0
    """Weight decay of the ZO step."""
    bits: int = 8
    """Bytes per projected gradient on the wire: 8 = one byte (log scale), 32 = fp32."""
    center: int = 0
    """One-byte codec: shift the representable |g| window [e^-3.9, e^3.9] by center/16 nats."""
    samples: int = 1
    """Perturbations per worker (per pair with --perturb-parallel) per step."""
    perturb_parallel: bool = False
    """DistZO2 perturbation parallelism: ranks 2i, 2i+1 compute the +eps and -eps forward of the same perturbation and swap losses (needs an even --workers; with 4 or more it is 2-D: pairs x data parallel)."""
    restore: str = "copy"
    """How theta is restored after a perturbed forward: copy (saved on the device, exact) or host (saved in host memory, exact; the accelerator holds only inference memory)."""
    workers: int = 2
    """Local worker processes (Gloo on CPU, one thread each)."""
    link: str | None = None
    """Emulated link between workers, as for `lowband train`."""
    device: str = "auto"
    """cpu, cuda, or auto (one GPU per worker when there are enough GPUs, else CPU)."""
    threads: int = 1
    """CPU threads per worker process."""
    compile: bool | None = None
    """Draw the perturbations with a compiled kernel (torch.compile; the same numbers as eager, faster on large models; --compile / --no-compile; default: on for CUDA, off on CPU)."""
    eval_every: int = 50
    """Evaluate the held-out split every this many steps (and at the last step)."""
    eval_batches: int = 8
    """Batches of the held-out split per evaluation."""
    log_every: int = 5
    """Write a metrics line every this many steps (and at every evaluation)."""
    ckpt_every: int = 100
    """Save the model every this many steps (and at the last step); 0 only at the end, -1 never. Between checkpoints the (seed, scalar) log, written every step, is what a restarted or new worker replays."""
    keep_checkpoints: int = 2
    """How many recent model checkpoints to keep."""

    def to_dict(self) -> dict:
        return {"algo": "zo", **dataclasses.asdict(self)}  # "algo" labels the run in reports

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# The range of every numeric option (inclusive; None: unbounded on that side). check_ranges
# refuses a value outside it, and any NaN or infinity, before anything is written; the CLI's
# generated test drives every numeric flag through 0, -1, NaN, inf and an absurd value.
BIG = 10**9
TRAIN_RANGES: dict[str, tuple[float | None, float | None]] = {
    "seed": (0, 2**63 - 1), "steps": (1, BIG), "tokens": (1, 10**18), "batch_size": (1, 2**20),
    "seq_len": (1, 2**24), "lr": (1e-12, 10.0), "warmup_steps": (0, BIG),
    "min_lr_ratio": (0.0, 1.0), "weight_decay": (0.0, 10.0), "grad_clip": (0.0, 1e6),
    "workers": (1, 4096), "threads": (1, 1024), "byzantine_tolerance": (0, 4096),
    "attackers": (0, 4096), "stragglers": (0, 4096), "slow_workers": (0, 4096),
    "straggler_delay": (0.0, 3600.0), "cp": (1, 4096), "cp_ulysses": (1, 4096),
    "eval_every": (1, BIG), "eval_batches": (1, 10**6), "log_every": (1, BIG),
    "ckpt_every": (-1, BIG), "keep_checkpoints": (1, 10**6), "min_workers": (1, 4096),
    "restarts": (0, 10**6), "timeout": (1e-3, 1e7), "quorum_timeout": (1e-3, 1e7),
    "heartbeat_timeout": (1e-3, 1e7), "join_timeout": (1e-3, 1e7), "parity_every": (0, BIG),
    "detect_every": (0, BIG),
}  # fmt: skip
FINETUNE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "seed": (0, 2**63 - 1), "steps": (1, BIG), "batch_size": (1, 2**20), "seq_len": (1, 2**24),
    "lr": (1e-12, 10.0), "eps": (1e-12, 1.0), "weight_decay": (0.0, 10.0), "bits": (8, 32),
    "center": (-64, 64), "samples": (1, 10**6), "workers": (1, 4096), "threads": (1, 1024),
    "eval_every": (1, BIG), "eval_batches": (1, 10**6), "log_every": (1, BIG),
    "ckpt_every": (-1, BIG), "keep_checkpoints": (1, 10**6),
}  # fmt: skip


def check_ranges(obj: object, ranges: dict[str, tuple[float | None, float | None]]) -> None:
    """ConfigError (one line) for a numeric field that is NaN, infinite or outside its range."""
    import math

    from lowband.errors import ConfigError

    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
        lo, hi = ranges.get(f.name, (None, None))
        if lo is not None and value < lo:
            floor = "positive" if isinstance(lo, float) and 0 < lo <= 1e-3 else f"at least {lo}"
            raise ConfigError(f"{flag} must be {floor}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(f"{flag} must be at most {hi}, got {value}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (its bases' too), read from its source."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


__all__ = [
    "TrainConfig", "FinetuneConfig", "field_docs", "DEFAULT_LR", "field", "check_ranges",
    "TRAIN_RANGES", "FINETUNE_RANGES",
]  # fmt: skip
