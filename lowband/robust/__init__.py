"""Byzantine-robust aggregation: rules over n workers' updates, attacks, and a robust all-gather."""

from lowband.robust.aggregators import (
    AGGREGATORS,
    CenteredClipping,
    bulyan,
    centered_clipping,
    check_tolerance,
    coordinate_median,
    finite_rows,
    geometric_median,
    get_aggregator,
    krum,
    mean,
    multi_krum,
    trimmed_mean,
)
from lowband.robust.attacks import ATTACKS, LabelFlipSampler, apply_attack, flip_labels, get_attack
from lowband.robust.collective import RobustReducer, robust_all_reduce, robust_all_reduce_bytes
from lowband.robust.flag import flag_aggregator

__all__ = [
    "AGGREGATORS",
    "ATTACKS",
    "CenteredClipping",
    "LabelFlipSampler",
    "RobustReducer",
    "apply_attack",
    "bulyan",
    "centered_clipping",
    "check_tolerance",
    "coordinate_median",
    "finite_rows",
    "flag_aggregator",
    "flip_labels",
    "geometric_median",
    "get_aggregator",
    "get_attack",
    "krum",
    "mean",
    "multi_krum",
    "robust_all_reduce",
    "robust_all_reduce_bytes",
    "trimmed_mean",
]
