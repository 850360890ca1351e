"""Long-context attention across ranks: Ulysses, zigzag ring, TokenRing, their hybrid, and a
variable-length balancer. See docs/seqpar.md."""

from lowband.seqpar.attention import (
    hybrid_attention,
    reference_attention,
    ring_attention,
    token_ring_attention,
    ulysses_attention,
)
from lowband.seqpar.balance import BalanceReport, Placement, balance
from lowband.seqpar.blocks import select_backend
from lowband.seqpar.layout import Layout, Mask, plan

__all__ = [
    "BalanceReport",
    "Layout",
    "Placement",
    "balance",
    "Mask",
    "hybrid_attention",
    "plan",
    "reference_attention",
    "ring_attention",
    "select_backend",
    "token_ring_attention",
    "ulysses_attention",
]
