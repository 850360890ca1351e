"""Gradient coding against stragglers: codes, sequential (multi-round) schedules, coded rounds."""

from lowband.coding.encoders import (
    CODES,
    GradientCode,
    cyclic_mds,
    decode_coefficients,
    fractional_repetition,
    get_code,
    worst_decode_residual,
)
from lowband.coding.sequential import (
    BurstyStragglerModel,
    Minitask,
    MultiplexedSGC,
    SelectiveRepeatSGC,
)
from lowband.coding.straggler import CodedRound, StragglerInjector, coded_round

__all__ = [
    "CODES",
    "BurstyStragglerModel",
    "CodedRound",
    "GradientCode",
    "Minitask",
    "MultiplexedSGC",
    "SelectiveRepeatSGC",
    "StragglerInjector",
    "coded_round",
    "cyclic_mds",
    "decode_coefficients",
    "fractional_repetition",
    "get_code",
    "worst_decode_residual",
]
