"""Zeroth-order training with shared randomness (MeZO, Just One Byte): see docs/zo.md."""

from lowband.zo.codec import decode, encode
from lowband.zo.distributed import ZOEntry, ZOLog, ZOTrainer, replay, seed_for
from lowband.zo.spsa import apply_update_, noise, perturb_, spsa_grad

__all__ = [
    "ZOEntry",
    "ZOLog",
    "ZOTrainer",
    "apply_update_",
    "decode",
    "encode",
    "noise",
    "perturb_",
    "replay",
    "seed_for",
    "spsa_grad",
]
