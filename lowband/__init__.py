"""lowband: training when the network is the bottleneck.

import lowband
comm = lowband.Comm(process_group, lowband.LinkSpec.parse("100mbit:50ms"))
with lowband.DDP(model, optimizer, comm) as algo:
    ...  # your own loop: loss.backward(); optimizer.step()
"""

__version__ = "0.1.0"

from lowband.algorithms import ALGORITHMS, Algorithm  # noqa: E402
from lowband.comm import Comm, CommStats, LinkMap, LinkSpec, get_codec, quantized_all_reduce  # noqa: E402
from lowband.comm.sparse import TopK as SparseCompressor  # noqa: E402
from lowband.comm.sync import StaticGroup, SyncGroup  # noqa: E402
from lowband.errors import LowbandError  # noqa: E402
from lowband.fault.elastic import ElasticGroup, start_lighthouse  # noqa: E402 - torchft on use
from lowband.train.writer import RunWriter  # noqa: E402

# Every registered algorithm is exported under its class name: lowband.DiLoCo, lowband.CO2, ...
globals().update({cls.__name__: cls for cls in ALGORITHMS.values()})

__all__ = [
    *sorted(cls.__name__ for cls in ALGORITHMS.values()),
    "Algorithm",
    "ElasticGroup",
    "start_lighthouse",
    "StaticGroup",
    "SyncGroup",
    "Comm",
    "CommStats",
    "LinkMap",
    "LinkSpec",
    "LowbandError",
    "RunWriter",
    "SparseCompressor",
    "get_codec",
    "quantized_all_reduce",
]
