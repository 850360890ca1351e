"""lowband: training when the network is the bottleneck.

import lowband
comm = lowband.Comm(process_group, lowband.LinkSpec.parse("100mbit:50ms"))
with lowband.DDP(model, optimizer, comm) as algo:
    ...  # your own loop: loss.backward(); optimizer.step()
"""

__version__ = "0.1.0"

from lowband.algorithms import CO2, DDP, Algorithm, DiLoCo, NoLoCo, StreamingDiLoCo  # noqa: E402
from lowband.comm import Comm, CommStats, LinkSpec, get_codec, quantized_all_reduce  # noqa: E402
from lowband.errors import LowbandError  # noqa: E402

__all__ = [
    "CO2",
    "DDP",
    "NoLoCo",
    "Algorithm",
    "DiLoCo",
    "StreamingDiLoCo",
    "Comm",
    "CommStats",
    "LinkSpec",
    "LowbandError",
    "get_codec",
    "quantized_all_reduce",
]
