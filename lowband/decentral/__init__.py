"""Decentralized training over a graph: topologies and mixing matrices (docs/decentralized.md).

The algorithms themselves are in lowband/algorithms/ (dpsgd.py, dfedsam.py), written against a
sync group like every other; this package holds what they share, the graph (topology.py), and
DADAO, which has its own command: the rule and its runtimes (dadao.py), the per-edge gossip rates
and their SDP (rates.py), the convex problems and the gradient-tracking baseline (problems.py),
and `lowband dadao` (command.py).
"""

from lowband.decentral.topology import Topology, check_spec, parse_topology, spectral_gap

__all__ = ["Topology", "check_spec", "parse_topology", "spectral_gap"]
