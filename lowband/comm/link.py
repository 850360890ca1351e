"""An emulated wide-area link: bandwidth, one-way latency, jitter and loss.

Every worker is modelled as sitting behind its own full-duplex uplink of `bandwidth` with a
one-way `latency` to every peer (the shape of workers spread over data centres). A collective is
described by how many bytes the busiest worker must push through its uplink and how many
sequential latency hops it needs; its emulated duration is

    rounds * latency  +  critical_bytes * 8 / bandwidth  (+ jitter and loss, below)

The link model is applied inside `lowband.comm.Comm`, on top of the real (loopback or NVLink)
transfer, so wall-clock reflects the link on any machine, GPU machines included.

Spec strings follow tc's units: `100mbit:50ms`, `1gbit:20ms:2ms:0.1%`
(bandwidth : one-way latency [: jitter] [: loss%] [: noise=SIGMA]). `noise=SIGMA` adds i.i.d.
N(0, SIGMA^2) to every received floating-point element (lowband.comm.Comm; docs/federated.md);
`noise=SIGMA` alone is a link with no delay, only noise. Bandwidth units: bit, kbit, mbit, gbit, tbit
(bits per second, powers of 1000) and bps, kbps, mbps, gbps (BYTES per second, as in tc).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from lowband.errors import ConfigError

_BANDWIDTH_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "bps": 8.0,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


def _parse_bandwidth(text: str, spec: str) -> float:
    m = re.fullmatch(_NUMBER + r"\s*([a-z]+)", text.strip().lower())
    if not m or m.group(2) not in _BANDWIDTH_UNITS or float(m.group(1)) <= 0:
        raise ConfigError(
            f"malformed --link {spec!r}: bandwidth {text!r} must be a positive number with a unit "
            f"({', '.join(_BANDWIDTH_UNITS)}), e.g. 100mbit:50ms"
        )
    return float(m.group(1)) * _BANDWIDTH_UNITS[m.group(2)]


def _parse_time(text: str, spec: str, what: str) -> float:
    m = re.fullmatch(_NUMBER + r"\s*(us|ms|s)", text.strip().lower())
    if not m:
        raise ConfigError(
            f"malformed --link {spec!r}: {what} {text!r} must be a number with a unit (us, ms, s), e.g. 50ms"
        )
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def _parse_noise(text: str, spec: str) -> float:
    try:
        sigma = float(text)
    except ValueError:
        sigma = -1.0
    if not 0.0 <= sigma < math.inf:
        raise ConfigError(
            f"malformed --link {spec!r}: noise={text!r} must be a finite standard deviation >= 0, "
            "e.g. noise=0.01"
        )
    return sigma


@dataclass(frozen=True)
class LinkSpec:
    """A link every worker sits behind; `LinkSpec.parse("100mbit:50ms")`."""

    bandwidth_bps: float
    """Bandwidth of each worker's uplink, in bits per second (math.inf: unlimited)."""
    latency_s: float = 0.0
    """One-way latency between any two workers, in seconds."""
    jitter_s: float = 0.0
    """Each latency hop is lengthened by a uniform random delay in [0, jitter_s]."""
    loss: float = 0.0
    """Probability that one round of a collective is lost and resent after a timeout (2 RTT)."""
    noise: float = 0.0
    """Standard deviation of the additive Gaussian noise on every received fp32/fp16/bf16 element."""

    @classmethod
    def parse(cls, spec: str | None) -> LinkSpec | None:
        """Parse `BW:LATENCY[:JITTER][:LOSS%]`; `None`, "" or "none" mean no emulated link."""
        if spec is None or spec.strip().lower() in ("", "none", "off"):
            return None
        parts = [p for p in spec.split(":")]
        noise = 0.0
        if parts and parts[-1].strip().lower().startswith("noise="):
            noise = _parse_noise(parts.pop().strip()[6:], spec)
            if not parts:
                return cls(bandwidth_bps=math.inf, noise=noise)
        if len(parts) < 2 or len(parts) > 4 or any(not p.strip() for p in parts):
            raise ConfigError(
                f"malformed --link {spec!r}: expected BANDWIDTH:LATENCY[:JITTER][:LOSS%][:noise=SIGMA], e.g. 100mbit:50ms"
            )
        bandwidth = _parse_bandwidth(parts[0], spec)
        latency = _parse_time(parts[1], spec, "latency")
        jitter, loss = 0.0, 0.0
        for extra in parts[2:]:
            extra = extra.strip()
            if extra.endswith("%"):
                try:
                    loss = float(extra[:-1]) / 100.0
                except ValueError:
                    loss = -1.0
                if not 0.0 <= loss < 1.0:
                    raise ConfigError(
                        f"malformed --link {spec!r}: loss {extra!r} must be a percentage in [0, 100)"
                    )
            else:
                jitter = _parse_time(extra, spec, "jitter")
        return cls(
            bandwidth_bps=bandwidth, latency_s=latency, jitter_s=jitter, loss=loss, noise=noise
        )

    def __str__(self) -> str:
        bw = self.bandwidth_bps
        if math.isinf(bw) and self.noise and not (self.latency_s or self.jitter_s or self.loss):
            return f"noise={self.noise:g}"  # what parse("noise=SIGMA") gives
        if math.isinf(bw):
            text = "inf"
        else:
            for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
                if bw >= scale:
                    text = f"{bw / scale:g}{unit}"
                    break
        text += f":{self.latency_s * 1e3:g}ms"
        if self.jitter_s:
            text += f":{self.jitter_s * 1e3:g}ms"
        if self.loss:
            text += f":{self.loss * 100:g}%"
        if self.noise:
            text += f":noise={self.noise:g}"
        return text

    def ideal_time(self, critical_bytes: int, rounds: int) -> float:
        """Duration without jitter or loss: the model's prediction for a collective."""
        seconds = rounds * self.latency_s
        if not math.isinf(self.bandwidth_bps):
            seconds += critical_bytes * 8.0 / self.bandwidth_bps
        return seconds

    def sample_time(self, critical_bytes: int, rounds: int, rng: random.Random) -> float:
        """One draw of the duration, with jitter per hop and loss per round."""
        seconds = self.ideal_time(critical_bytes, rounds)
        if self.jitter_s:
            seconds += sum(rng.uniform(0.0, self.jitter_s) for _ in range(rounds))
        if self.loss:
            # A lost round is detected after a retransmission timeout of two round trips
            # (at least 1 ms) and resent; the resend can be lost again.
            rto = max(4.0 * self.latency_s, 1e-3)
            per_round = critical_bytes / max(rounds, 1) * 8.0 / self.bandwidth_bps
            for _ in range(rounds):
                while rng.random() < self.loss:
                    seconds += rto + per_round
        return seconds


class LinkMap:
    """A link per pair of workers (`--link-map FILE.json`): e.g. two sites with fast links inside
    and a slow one between. The file:

        {"default": "1gbit:1ms",                       # any pair not named below (optional)
         "sites": [[0, 1, 2, 3], [4, 5, 6, 7]],        # workers by site (optional)
         "intra": "10gbit:100us", "inter": "100mbit:80ms",   # within / between sites
         "pairs": [[0, 5, "1gbit:10ms"]]}              # single pairs, either direction (optional)

    A pair's link is its `pairs` entry, else `intra`/`inter` by site, else `default`; a pair with
    none of these is an error when a group containing both is made. Ranks are global ranks.

    How `lowband.comm.Comm` applies it: a point-to-point message uses its pair's link; a collective
    over a group uses the group's slowest pair (`for_ranks`: lowest bandwidth, highest latency,
    jitter, loss and noise). That is exact for a ring all-reduce, whose every step waits for the
    slowest link of the ring, and an upper bound for trees laid out by site; it is what the
    planner (lowband.plan) assumes too.
    """

    def __init__(
        self,
        default: LinkSpec | None = None,
        sites: list[list[int]] | None = None,
        intra: LinkSpec | None = None,
        inter: LinkSpec | None = None,
        pairs: dict[tuple[int, int], LinkSpec | None] | None = None,
        name: str = "link map",
    ) -> None:
        self.default, self.intra, self.inter, self.name = default, intra, inter, name
        self.pairs = dict(pairs or {})
        self.site_of: dict[int, int] = {}
        for s, members in enumerate(sites or []):
            for r in members:
                if r in self.site_of:
                    raise ConfigError(f"{name}: worker {r} is in two sites")
                self.site_of[r] = s
        self.sites = [list(m) for m in sites or []]

    _KEYS = ("default", "sites", "intra", "inter", "pairs")

    @classmethod
    def load(cls, path: str) -> LinkMap:
        """Read and check a link-map file; any problem is a one-line ConfigError."""
        import json
        from pathlib import Path

        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except OSError as e:
            raise ConfigError(f"--link-map {path}: cannot read it ({e.strerror or e})") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"--link-map {path}: not JSON ({e})") from None
        return cls.from_dict(data, name=f"--link-map {path}")

    @classmethod
    def from_dict(cls, data, name: str = "link map") -> LinkMap:
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: expected a JSON object with keys {', '.join(cls._KEYS)}")
        unknown = sorted(set(data) - set(cls._KEYS))
        if unknown:
            raise ConfigError(
                f"{name}: unknown key {unknown[0]!r}; expected {', '.join(cls._KEYS)}"
            )

        def spec(key, text):
            if not isinstance(text, str):
                raise ConfigError(f"{name}: {key} must be a link string such as '100mbit:50ms'")
            return LinkSpec.parse(text)

        def rank(value, where):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}: {where} must hold worker ranks (integers >= 0)")
            return value

        sites = data.get("sites")
        if sites is not None:
            if not isinstance(sites, list) or not all(isinstance(m, list) and m for m in sites):
                raise ConfigError(f"{name}: sites must be a list of non-empty lists of ranks")
            sites = [[rank(r, "sites") for r in m] for m in sites]
            if "intra" not in data or "inter" not in data:
                raise ConfigError(f"{name}: sites need both 'intra' and 'inter' links")
        elif "intra" in data or "inter" in data:
            raise ConfigError(f"{name}: 'intra'/'inter' need 'sites'")
        pairs: dict[tuple[int, int], LinkSpec | None] = {}
        for entry in data.get("pairs") or []:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ConfigError(f"{name}: each pair must be [RANK, RANK, LINK], got {entry!r}")
            a, b = rank(entry[0], "pairs"), rank(entry[1], "pairs")
            if a == b:
                raise ConfigError(f"{name}: pair [{a}, {b}] joins a worker to itself")
            pairs[(min(a, b), max(a, b))] = spec(f"pair [{a}, {b}]", entry[2])
        return cls(
            default=spec("default", data["default"]) if "default" in data else None,
            sites=sites,
            intra=spec("intra", data["intra"]) if "intra" in data else None,
            inter=spec("inter", data["inter"]) if "inter" in data else None,
            pairs=pairs,
            name=name,
        )

    def between(self, a: int, b: int) -> LinkSpec | None:
        """The link between global ranks a and b (None: unlimited)."""
        key = (min(a, b), max(a, b))
        if key in self.pairs:
            return self.pairs[key]
        if a in self.site_of and b in self.site_of:
            return self.intra if self.site_of[a] == self.site_of[b] else self.inter
        if self.default is not None:
            return self.default
        raise ConfigError(
            f"{self.name}: no link between workers {a} and {b} (add a 'default', put both in "
            "'sites', or name the pair)"
        )

    def check(self, world: int) -> None:
        """Every pair of `world` workers has a link, and no rank named is outside the world."""
        named = set(self.site_of) | {r for p in self.pairs for r in p}
        outside = sorted(r for r in named if r >= world)
        if outside:
            raise ConfigError(f"{self.name}: worker {outside[0]} named, but --workers is {world}")
        self.for_ranks(range(world))

    def for_ranks(self, ranks) -> LinkSpec | None:
        """The link a collective over `ranks` sees: its slowest pair (None: all unlimited)."""
        ranks = list(ranks)
        pairs = [self.between(a, b) for i, a in enumerate(ranks) for b in ranks[i + 1 :]]
        links = [x for x in pairs if x is not None]  # None: an unlimited pair
        if not links:
            return None
        return LinkSpec(
            bandwidth_bps=min(x.bandwidth_bps for x in links),
            latency_s=max(x.latency_s for x in links),
            jitter_s=max(x.jitter_s for x in links),
            loss=max(x.loss for x in links),
            noise=max(x.noise for x in links),
        )

    def __str__(self) -> str:
        parts = []
        if self.sites:
            parts.append(f"{len(self.sites)} sites, {self.intra} inside, {self.inter} between")
        if self.pairs:
            parts.append(f"{len(self.pairs)} named pairs")
        if self.default is not None:
            parts.append(f"{self.default} otherwise")
        return "map: " + "; ".join(parts)


def resolve_link(link: str | None, link_map: str | None) -> LinkSpec | LinkMap | None:
    """What `--link` and `--link-map` give a Comm (they exclude each other)."""
    if link_map:
        if link and LinkSpec.parse(link) is not None:
            raise ConfigError("--link and --link-map exclude each other: put the links in the map")
        return LinkMap.load(link_map)
    return LinkSpec.parse(link)
