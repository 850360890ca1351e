"""Every byte on the wire goes through here: accounting, emulated links, codecs, quantized collectives."""

from lowband.comm.accounting import CommStats, OpStats, Traffic
from lowband.comm.codecs import Codec, get_codec
from lowband.comm.group import Comm, Work
from lowband.comm.link import LinkMap, LinkSpec, resolve_link
from lowband.comm.quantized import quantized_all_reduce, quantized_all_reduce_bytes

__all__ = [
    "Codec",
    "Comm",
    "CommStats",
    "LinkMap",
    "LinkSpec",
    "OpStats",
    "Traffic",
    "Work",
    "get_codec",
    "quantized_all_reduce",
    "quantized_all_reduce_bytes",
    "resolve_link",
]
