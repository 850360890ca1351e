"""Every byte on the wire goes through here: accounting, emulated links, (later) codecs."""

from lowband.comm.accounting import CommStats, OpStats, Traffic
from lowband.comm.group import Comm, Work
from lowband.comm.link import LinkSpec

__all__ = ["Comm", "CommStats", "LinkSpec", "OpStats", "Traffic", "Work"]
