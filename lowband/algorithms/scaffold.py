"""SCAFFOLD, its one-vector simplified form, SCALLION and SCAFCOM (docs/federated.md).

SCAFFOLD (Karimireddy et al. 2020, option II), on the star rounds of lowband.algorithms.federated:
  1. local steps on the corrected gradient g_i(y) - c_i + c (`correction`);
  2. uplink (y_i - x, dc_i) with dc_i = c_i+ - c_i, c_i+ = gbar_i (the mean raw local gradient,
     equal to option II's c_i - c + (x - y_i)/(K eta_l) under SGD);
  3. server: x <- x + eta_g mean dy_i ; c <- c + (|S|/N) mean dc_i ; downlink (x, c);
  4. participants: c_i <- c_i+.

The simplified form (Huang, Li and Li 2023) sends only Delta_i = gbar_i - c_i
(= (x - y_i)/(K eta_l) - c under SGD) and the server rebuilds the model step from it:
  x <- x - eta_g K eta_l (c + mean delta_i) ; c <- c + alpha (|S|/N) mean delta_i ;
  c_i <- c_i + alpha delta_i,
with delta_i = C(Delta_i) for SCALLION (unbiased C, alpha = --cv-scale) and, for SCAFCOM,
delta_i = C(v_i - c_i) after the client momentum v_i <- (1 - beta) v_i + beta gbar_i (biased C).
The identity compressor with alpha = 1 (beta = 1) is SCAFFOLD to rounding (tests/test_federated.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np
import torch

from lowband.algorithms.federated import Federated, FederatedOptions
from lowband.algorithms.registry import OptionError

# -- compressors ---------------------------------------------------------------------------------


def _generator(seed: int, round_: int, worker: int) -> torch.Generator:
    """Randomness shared by a client and the server for one round (rand-k's indices)."""
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, round_, worker]).generate_state(1)[0])
    )


class Compressor:
    """C(v): `encode` gives the tensors that travel, `decode` the dense fp32 vector back."""

    unbiased = True

    def encode(self, v: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        return [v.clone()]

    def decode(self, wire: list[torch.Tensor], d: int, gen: torch.Generator) -> torch.Tensor:
        return wire[0].float()

    def wire_like(self, d: int) -> list[torch.Tensor]:
        return [torch.empty(d)]

    def __call__(self, v: torch.Tensor, gen_seed: tuple[int, int, int]) -> torch.Tensor:
        """decode(encode(v)): what the server will see (the client applies it to its c_i)."""
        return self.decode(self.encode(v, _generator(*gen_seed)), v.numel(), _generator(*gen_seed))


class RandK(Compressor):
    """Unbiased rand-k: k coordinates drawn from the shared seed, scaled by d/k; only values travel."""

    def __init__(self, frac: float) -> None:
        self.frac = frac

    def _k(self, d: int) -> int:
        return max(1, math.ceil(self.frac * d))

    def _index(self, d: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randperm(d, generator=gen)[: self._k(d)]

    def encode(self, v, gen):
        return [v[self._index(v.numel(), gen)] * (v.numel() / self._k(v.numel()))]

    def decode(self, wire, d, gen):
        out = torch.zeros(d)
        out[self._index(d, gen)] = wire[0].float()
        return out

    def wire_like(self, d):
        return [torch.empty(self._k(d))]


class QSGD(Compressor):
    """Unbiased stochastic rounding of v / max|v| to s = 2^(B-1) - 1 levels, with sign (int8)."""

    def __init__(self, bits: int) -> None:
        self.levels = 2 ** (bits - 1) - 1

    def encode(self, v, gen):
        scale = v.abs().max().clamp_min(1e-30)
        u = v.abs() / scale * self.levels
        q = torch.floor(u + torch.rand(u.shape, generator=gen))
        return [(torch.sign(v) * q).to(torch.int8), scale.reshape(1).float()]

    def decode(self, wire, d, gen):
        return wire[0].float() * (wire[1].float() / self.levels)

    def wire_like(self, d):
        return [torch.empty(d, dtype=torch.int8), torch.empty(1)]


class TopK(Compressor):
    """Biased top-k: the k largest magnitudes (fp32 values + int32 indices)."""

    unbiased = False

    def __init__(self, frac: float) -> None:
        self.frac = frac

    def _k(self, d: int) -> int:
        return max(1, math.ceil(self.frac * d))

    def encode(self, v, gen):
        idx = torch.topk(v.abs(), self._k(v.numel()), sorted=False).indices
        return [v[idx].clone(), idx.to(torch.int32)]

    def decode(self, wire, d, gen):
        out = torch.zeros(d)
        out[wire[1].long()] = wire[0].float()
        return out

    def wire_like(self, d):
        return [torch.empty(self._k(d)), torch.empty(self._k(d), dtype=torch.int32)]


class ScaledSign(Compressor):
    """Biased scaled sign: (||v||_1 / d) sign(v), one bit per coordinate plus one fp32."""

    unbiased = False

    def encode(self, v, gen):
        bits = np.packbits((v >= 0).numpy().astype(np.uint8))
        return [torch.from_numpy(bits), (v.abs().mean()).reshape(1).float()]

    def decode(self, wire, d, gen):
        signs = np.unpackbits(wire[0].numpy())[:d].astype(np.float32) * 2 - 1
        return torch.from_numpy(signs) * wire[1].float()

    def wire_like(self, d):
        return [torch.empty((d + 7) // 8, dtype=torch.uint8), torch.empty(1)]


def get_compressor(spec: str) -> Compressor:
    """identity | randk:F | qsgd:B | topk:F | sign (docs/federated.md); OptionError otherwise."""
    text = spec.strip().lower()
    if text == "identity":
        return Compressor()
    if text == "sign":
        return ScaledSign()
    m = re.fullmatch(r"(randk|topk|qsgd):(\d+(?:\.\d*)?|\.\d+)", text)
    if m and m.group(1) in ("randk", "topk") and 0.0 < float(m.group(2)) <= 1.0:
        return (RandK if m.group(1) == "randk" else TopK)(float(m.group(2)))
    if m and m.group(1) == "qsgd" and m.group(2).isdigit() and 2 <= int(m.group(2)) <= 8:
        return QSGD(int(m.group(2)))
    raise OptionError(
        "{compressor=} is not a compressor: expected identity, randk:F, topk:F (0 < F <= 1), "
        "qsgd:B (2 <= B <= 8) or sign",
        compressor=spec,
    )


# -- SCAFFOLD ------------------------------------------------------------------------------------


class Scaffold(Federated):
    """SCAFFOLD, option II, two uplink vectors (module docstring)."""

    name = "scaffold"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.c = torch.zeros_like(self.x)
        """Server control variate c (the server's; a client's last received copy)."""
        self.c_i = torch.zeros_like(self.x)
        """This client's control variate."""
        self._pending: torch.Tensor | None = None

    def correction(self, y):
        return self.c - self.c_i

    def client_vectors(self, y, round_):
        dc = self.gbar() - self.c_i  # c_i+ - c_i, c_i+ = gbar_i (option II under SGD)
        self._pending = dc
        return [y - self.x, dc]

    def wire_like(self, worker, round_):
        return [torch.empty_like(self.x), torch.empty_like(self.x)]

    def server_step(self, agg, rows):
        x, c = scaffold_server_step(
            self.x, self.c, agg[0], agg[1], len(rows), self.comm.size, self.options.server_lr
        )
        self.x.copy_(x)
        self.c.copy_(c)

    def downlink(self):
        return [self.x, self.c]

    def take_downlink(self, tensors):
        self.x.copy_(tensors[0])
        self.c.copy_(tensors[1])

    def finish(self, participant, y):
        if participant and self._pending is not None:
            self.c_i.add_(self._pending)
        self._pending = None

    def extra_state(self):
        return {"c": self.c, "c_i": self.c_i}


# -- the simplified form, SCALLION, SCAFCOM -------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class ScallionOptions(FederatedOptions):
    """Options of --algo scallion."""

    local_lr: float = 0.01
    """eta_l of the server's model step x <- x - eta_g K eta_l (c + mean delta_i) (the paper's local SGD rate)."""
    compressor: str = "randk:0.05"
    """Uplink compressor: identity, randk:F, qsgd:B (unbiased; scallion), topk:F, sign (biased; scafcom)."""
    cv_scale: float = 1.0
    """alpha: control variates move by alpha x the compressed delta (<= 1/(1 + omega) in the paper's analysis)."""
    server_opt: str = "sgd"
    """The server's model step on the estimate c + mean delta_i: sgd (the paper's) or adam (ours: Adam-normalised, step eta_g K eta_l per round; for AdamW clients)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.server_opt not in ("sgd", "adam"):
            raise OptionError("{server_opt=} must be sgd or adam", server_opt=self.server_opt)
        if not self.local_lr > 0:
            raise OptionError(f"{{local_lr}} must be positive, got {self.local_lr}")
        if not 0.0 < self.cv_scale <= 1.0:
            raise OptionError(f"{{cv_scale}} must be in (0, 1], got {self.cv_scale}")
        get_compressor(self.compressor)


class Scallion(Scaffold):
    """SCALLION: one uplink vector, an unbiased compressor (module docstring)."""

    name = "scallion"
    Options = ScallionOptions
    biased_ok = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compressor = get_compressor(self.options.compressor)
        self.adam_m = torch.zeros_like(self.x)  # --server-opt adam (the server's only)
        self.adam_v = torch.zeros_like(self.x)
        self.adam_t = 0
        if not self.compressor.unbiased and not self.biased_ok:
            raise OptionError(
                "{compressor=} is biased; scallion needs an unbiased one (identity, randk:F, "
                "qsgd:B), or use --algo scafcom",
                compressor=self.options.compressor,
            )

    def _delta(self) -> torch.Tensor:
        return self.gbar() - self.c_i  # = (x - y)/(K eta_l) - c under SGD

    def client_vectors(self, y, round_):
        return [self._delta()]

    def encode(self, vectors, worker, round_):
        gen = (self.seed, round_, worker)
        self._pending = self.compressor(vectors[0], gen)  # what the server will decode
        return self.compressor.encode(vectors[0], _generator(*gen))

    def decode(self, wire, worker, round_):
        return [self.compressor.decode(wire, self.x.numel(), _generator(self.seed, round_, worker))]

    def wire_like(self, worker, round_):
        return self.compressor.wire_like(self.x.numel())

    def server_step(self, agg, rows):
        o = self.options
        adam = (self.adam_m, self.adam_v, self.adam_t) if o.server_opt == "adam" else None
        x, c, adam = one_vector_server_step(
            self.x, self.c, agg[0], len(rows), self.comm.size,
            step_size=o.server_lr * self.K * o.local_lr, alpha=self.alpha, adam=adam,
        )  # fmt: skip
        self.x.copy_(x)
        self.c.copy_(c)
        if adam is not None:
            self.adam_m.copy_(adam[0])
            self.adam_v.copy_(adam[1])
            self.adam_t = adam[2]

    @property
    def alpha(self) -> float:
        return self.options.cv_scale

    def finish(self, participant, y):
        if participant and self._pending is not None:
            self.c_i.add_(self._pending, alpha=self.alpha)
        self._pending = None

    def extra_state(self):
        return {**super().extra_state(), "adam_m": self.adam_m, "adam_v": self.adam_v}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "adam_t": self.adam_t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.adam_t = int(state.get("adam_t", 0))


@dataclasses.dataclass(kw_only=True)
class ScafcomOptions(ScallionOptions):
    """Options of --algo scafcom."""

    compressor: str = "topk:0.05"
    """Uplink compressor: identity, randk:F, qsgd:B (unbiased; scallion), topk:F, sign (biased; scafcom)."""
    beta: float = 0.2
    """Client momentum beta: v_i <- (1 - beta) v_i + beta gbar_i (1: none)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.beta <= 1.0:
            raise OptionError(f"{{beta}} must be in (0, 1], got {self.beta}")


class Scafcom(Scallion):
    """SCAFCOM: SCALLION with client momentum, for biased compressors (module docstring)."""

    name = "scafcom"
    Options = ScafcomOptions
    biased_ok = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.v = torch.zeros_like(self.x)
        self._v_new: torch.Tensor | None = None

    @property
    def alpha(self) -> float:
        return 1.0

    def _delta(self):
        self._v_new = scafcom_momentum(self.v, self.gbar(), self.options.beta)
        return self._v_new - self.c_i

    def finish(self, participant, y):
        if participant and self._v_new is not None:
            self.v.copy_(self._v_new)
        self._v_new = None
        super().finish(participant, y)

    def extra_state(self):
        return {**super().extra_state(), "v": self.v}


# -- the server steps, pure (the classes above and the Flower strategies, lowband.flower) ---------


def scaffold_server_step(x, c, mean_dy, mean_dc, clients, n, server_lr=1.0):
    """SCAFFOLD's server: x + eta_g mean dy_i, c + (|S|/N) mean dc_i. Returns new (x, c)."""
    return torch.add(x, mean_dy, alpha=server_lr), torch.add(c, mean_dc, alpha=clients / n)


def one_vector_server_step(x, c, mean_delta, clients, n, *, step_size, alpha=1.0, adam=None):
    """The simplified form's server (SCALLION, SCAFCOM): x - step_size (c + mean delta_i),
    step_size = eta_g K eta_l; c + alpha (|S|/N) mean delta_i. `adam`: (m, v, t) for
    --server-opt adam (the step is Adam-normalised; beta 0.9, 0.99, bias-corrected), else None.
    Returns new (x, c, adam)."""
    step = c + mean_delta  # the gradient estimate
    if adam is not None:  # m, v on the server only
        m, v, t = adam
        t += 1
        m = torch.add(m * 0.9, step, alpha=0.1)
        v = torch.addcmul(v * 0.99, step, step, value=0.01)
        step = (m / (1 - 0.9**t)) / ((v / (1 - 0.99**t)).sqrt() + 1e-8)
        adam = (m, v, t)
    x = torch.sub(x, step, alpha=step_size)
    return x, torch.add(c, mean_delta, alpha=alpha * clients / n), adam


def scafcom_momentum(v, gbar, beta):
    """SCAFCOM's client momentum: (1 - beta) v_i + beta gbar_i."""
    return (1 - beta) * v + beta * gbar


# -- fp64 references (tests) ---------------------------------------------------------------------


def scaffold_reference(x, c, cs, grads, k, lr, server_lr=1.0, clients=None):
    """One SCAFFOLD round (option II, the paper's form) in fp64 with SGD local steps.
    Returns (x, c, cs) new; `clients`: the participants (default all)."""
    n = len(grads)
    clients = range(n) if clients is None else clients
    dys, dcs, cs = [], [], [c_.clone() for c_ in cs]
    for i in clients:
        y = x.clone()
        for _ in range(k):
            y = y - lr * (grads[i](y) - cs[i] + c)
        c_plus = cs[i] - c + (x - y) / (k * lr)
        dys.append(y - x)
        dcs.append(c_plus - cs[i])
        cs[i] = c_plus
    x = x + server_lr * torch.stack(dys).mean(0)
    c = c + torch.stack(dcs).sum(0) / n
    return x, c, cs


def simplified_reference(x, c, cs, grads, k, lr, server_lr=1.0, compress=None, alpha=1.0):
    """One round of the simplified form (SCALLION with `compress`, default identity), fp64."""
    n = len(grads)
    compress = compress if compress is not None else (lambda v, i: v)
    deltas, cs = [], [c_.clone() for c_ in cs]
    for i in range(n):
        y = x.clone()
        for _ in range(k):
            y = y - lr * (grads[i](y) - cs[i] + c)
        d = compress((x - y) / (k * lr) - c, i)
        deltas.append(d)
        cs[i] = cs[i] + alpha * d
    mean = torch.stack(deltas).mean(0)
    return x - server_lr * k * lr * (c + mean), c + alpha * mean, cs


def scafcom_reference(x, c, cs, vs, grads, k, lr, beta, compress, server_lr=1.0, clients=None):
    """One SCAFCOM round (Huang, Li and Li 2023, Algorithm 3) in fp64 with SGD local steps, in the
    paper's terms: local steps on g_i - c_i + c from y = x; participants only:
    v_i <- (1 - beta) v_i + beta ((x - y_i)/(K eta_l) - c + c_i)  (the mean local gradient);
    delta_i = C(v_i - c_i) (no error-feedback buffer: c_i carries the residual);
    c_i <- c_i + delta_i; server: x <- x - eta_g K eta_l (c + mean delta_i), c <- c + sum delta_i / N.
    `compress(v, i)` is C. Returns (x, c, cs, vs) new; `clients`: the participants (default all)."""
    n = len(grads)
    clients = range(n) if clients is None else clients
    deltas, cs, vs = [], [c_.clone() for c_ in cs], [v_.clone() for v_ in vs]
    for i in clients:
        y = x.clone()
        for _ in range(k):
            y = y - lr * (grads[i](y) - cs[i] + c)
        vs[i] = (1 - beta) * vs[i] + beta * ((x - y) / (k * lr) - c + cs[i])
        d = compress(vs[i] - cs[i], i)
        deltas.append(d)
        cs[i] = cs[i] + d
    mean = torch.stack(deltas).mean(0)
    return x - server_lr * k * lr * (c + mean), c + torch.stack(deltas).sum(0) / n, cs, vs


__all__ = [
    "Compressor",
    "QSGD",
    "RandK",
    "Scafcom",
    "Scaffold",
    "Scallion",
    "ScaledSign",
    "TopK",
    "get_compressor",
    "one_vector_server_step",
    "scafcom_momentum",
    "scafcom_reference",
    "scaffold_server_step",
    "scaffold_reference",
    "simplified_reference",
]
