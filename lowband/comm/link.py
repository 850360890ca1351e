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
