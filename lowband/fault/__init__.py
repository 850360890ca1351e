"""Fault tolerance building blocks: bit-parity of the shared state, C4-style detection, admission.

The elastic sync group (lowband.fault.elastic.ElasticGroup: quorum and live recovery on torchft's
Manager and Lighthouse) runs them after every committed round. See docs/fault.md.
"""

from lowband.fault.admission import (
    AdmissionError,
    AdmissionRefused,
    AdmissionServer,
    generate_secret,
    load_secret,
    request_admission,
)
from lowband.fault.detector import (
    CollectiveTimeout,
    Detector,
    LinkMatrix,
    SlowRankReport,
    probe_links,
    robust_z,
    watch,
)
from lowband.fault.parity import (
    DiLoCoSharedState,
    ParityReport,
    SharedState,
    check_parity,
    shared_state_of,
    shared_state_tensors,
    state_digest,
)

__all__ = [
    "AdmissionError",
    "AdmissionRefused",
    "AdmissionServer",
    "CollectiveTimeout",
    "Detector",
    "DiLoCoSharedState",
    "LinkMatrix",
    "ParityReport",
    "SharedState",
    "SlowRankReport",
    "check_parity",
    "generate_secret",
    "load_secret",
    "probe_links",
    "request_admission",
    "robust_z",
    "shared_state_of",
    "shared_state_tensors",
    "state_digest",
    "watch",
]
