"""Zeroth-order training with shared randomness (MeZO, Just One Byte): see docs/zo.md."""

from lowband.zo.codec import decode, encode
from lowband.zo.distributed import (
    StepResult,
    ZOEntry,
    ZOLog,
    ZOTrainer,
    apply_step_,
    replay,
    seed_for,
)
from lowband.zo.spsa import (
    apply_update_,
    noise,
    perturb_,
    perturbed_loss,
    spsa_grad,
    spsa_losses,
    two_point,
)

__all__ = [
    "StepResult",
    "ZOEntry",
    "ZOLog",
    "ZOTrainer",
    "apply_step_",
    "apply_update_",
    "decode",
    "encode",
    "noise",
    "perturb_",
    "perturbed_loss",
    "replay",
    "seed_for",
    "spsa_grad",
    "spsa_losses",
    "two_point",
]
