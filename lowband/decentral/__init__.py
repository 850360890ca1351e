"""Decentralized training over a graph: topologies and mixing matrices (docs/decentralized.md).

The algorithms themselves are in lowband/algorithms/ (dpsgd.py, dfedsam.py), written against a
sync group like every other; this package holds what they share: the graph.
"""

from lowband.decentral.topology import Topology, check_spec, parse_topology, spectral_gap

__all__ = ["Topology", "check_spec", "parse_topology", "spectral_gap"]
