"""The client side of lowband's Flower strategies: `FlowerClient` (lowband.flower)."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from lowband.algorithms.admm_nr import admm_nr_anchor
from lowband.algorithms.scaffold import get_compressor, scafcom_momentum
from lowband.errors import ConfigError
from lowband.flower.records import decode, encode, flatten, from_record, to_record, unflatten


class FlowerClient:
    """The client side of a lowband strategy, inside a ClientApp's train function:

        client = FlowerClient(msg, context)
        y = client.start.clone()                   # flat; load it into the model (`unflatten`)
        for _ in range(client.local_steps):        # any optimizer; the papers' is SGD
            y = y - lr * client.correct(y, grad(y))  # the raw gradient in, the rule's out
        return client.reply(y, num_examples=n)

    `correct` records the raw gradient (SCAFFOLD's gbar_i, ADMM-NR's gradient estimate) and adds
    the rule's correction (FedProx mu (y - x), SCAFFOLD c - c_i, ADMM-NR rho (y - a_i)); `reply`
    builds the payload of the module docstring and keeps the client's state in context.state.
    """

    def __init__(self, msg: Message, context: Context) -> None:
        self.msg, self.context = msg, context
        cfg = msg.content["config"]
        if "lowband.rule" not in cfg:
            raise ConfigError("FlowerClient: the message is not from a lowband.flower strategy")
        self.rule = str(cfg["lowband.rule"])
        self.settings = {
            k[len("lowband.") :]: v for k, v in cfg.items() if k.startswith("lowband.")
        }
        self.round, self.seed = int(cfg["server-round"]), int(self.settings["seed"])
        self.local_steps = int(self.settings["local-steps"])
        """K, the strategy's --local-steps (what the server's step of SCALLION/SCAFCOM assumes)."""
        self.like = msg.content["arrays"]
        self.x = flatten(self.like)
        zero = torch.zeros_like(self.x)
        saved = context.state["lowband"] if "lowband" in context.state else {}
        self.state = {k: torch.from_numpy(saved[k].numpy().copy()) for k in saved}
        self.grad_sum, self.grad_steps, self.grad_last = zero.clone(), 0, zero.clone()
        self.start = self.x
        """Where the local steps begin (ADMM-NR: the client's own model; else x)."""
        if "lowband.c" in msg.content:  # the SCAFFOLD family
            self.c = from_record(msg.content["lowband.c"])[0]
            self.c_i = self.state.get("c_i", zero)
        if self.rule == "admm-nr":
            z_end = (
                from_record(msg.content["lowband.z-end"])[0]
                if "lowband.z-end" in msg.content
                else self.x
            )
            z_start = self.state.get("z_start", self.x)
            g_last = self.state.get("g_last", zero)
            self.anchor = admm_nr_anchor(
                self.x, z_end, z_start, g_last, float(self.settings["rho"])
            )
            self.start = self.state.get("local", self.x)

    def correct(self, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The gradient to step with at y (flat), given the raw local gradient g."""
        self.grad_sum += g
        self.grad_steps += 1
        self.grad_last = g.clone()
        if self.rule == "fedprox":
            return g + float(self.settings["mu"]) * (y - self.x)
        if self.rule in ("scaffold", "scallion", "scafcom"):
            return g + (self.c - self.c_i)
        if self.rule == "admm-nr":
            return g + float(self.settings["rho"]) * (y - self.anchor)
        return g

    def reply(
        self, y: torch.Tensor, num_examples: int = 1, metrics: dict[str, float] | None = None
    ) -> Message:
        """The reply to the strategy, with y the local model after the round's steps (flat)."""
        gbar = self.grad_sum / max(self.grad_steps, 1)
        records: dict[str, ArrayRecord] = {}
        if self.rule in ("fedavg", "fedprox"):
            records["arrays"] = unflatten(y, self.like)
        elif self.rule == "scaffold":
            dc = gbar - self.c_i  # c_i+ - c_i, c_i+ = gbar_i (option II under SGD)
            records.update({"arrays": unflatten(y, self.like), "lowband.dc": to_record([dc])})
            self.state["c_i"] = self.c_i + dc
        elif self.rule in ("scallion", "scafcom"):
            delta = gbar - self.c_i
            if self.rule == "scafcom":
                self.state["v"] = scafcom_momentum(
                    self.state.get("v", torch.zeros_like(y)), gbar, float(self.settings["beta"])
                )
                delta = self.state["v"] - self.c_i
            comp = get_compressor(str(self.settings["compressor"]))
            gen = (self.seed, self.round, self.msg.metadata.dst_node_id)  # the server's too
            wire = encode(comp, delta, gen)
            seen = decode(comp, wire, y.numel(), gen).to(y.dtype)  # what the server decodes
            self.state["c_i"] = self.c_i + float(self.settings["cv-scale"]) * seen
            records["lowband.delta"] = to_record(wire)
        elif self.rule == "admm-nr":
            records["lowband.s"] = to_record([y + self.x - self.anchor])  # z_start is x now
            last = self.settings["grad-estimate"] == "last"
            self.state.update(z_start=self.x, g_last=self.grad_last if last else gbar, local=y)
        else:
            raise ConfigError(f"FlowerClient: unknown rule {self.rule!r}")
        self.context.state["lowband"] = ArrayRecord(
            {k: Array(v.detach().numpy().copy()) for k, v in self.state.items()}
        )
        content = RecordDict(
            {**records, "metrics": MetricRecord({"num-examples": num_examples, **(metrics or {})})}
        )
        return Message(content, reply_to=self.msg)


__all__ = ["FlowerClient"]
