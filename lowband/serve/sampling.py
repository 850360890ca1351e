"""Next-token choice: greedy, temperature and top-p (nucleus; Holtzman et al. 2020).

Shape suffixes: B batch, V vocabulary. Math in fp32 on the CPU, so a seed gives the same tokens
whatever device computed the logits (docs/inference.md, section 1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_p_filter(probs_BV: Tensor, top_p: float) -> Tensor:
    """probs with everything outside each row's nucleus zeroed and the rest renormalised.

    The nucleus is the shortest prefix of the tokens sorted by probability (descending, ties by
    token id) whose cumulative probability reaches top_p; its first token always stays.
    """
    if top_p >= 1.0:
        return probs_BV
    sorted_BV, order_BV = torch.sort(probs_BV, dim=-1, descending=True, stable=True)
    before_BV = torch.cumsum(sorted_BV, dim=-1) - sorted_BV  # mass of the better tokens
    keep_sorted_BV = before_BV < top_p
    keep_sorted_BV[:, 0] = True
    keep_BV = torch.zeros_like(keep_sorted_BV).scatter(-1, order_BV, keep_sorted_BV)
    kept_BV = torch.where(keep_BV, probs_BV, torch.zeros_like(probs_BV))
    return kept_BV / kept_BV.sum(-1, keepdim=True)


class Sampler:
    """`sampler(logits_BV) -> tokens_B`; one seeded CPU generator per request."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> None:
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature {temperature} must be >= 0, top_p {top_p} in (0, 1]")
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits_BV: Tensor) -> Tensor:
        logits_BV = logits_BV.detach().float().cpu()
        if self.temperature == 0:
            return logits_BV.argmax(-1)  # ties: the lowest id
        probs_BV = torch.softmax(logits_BV / self.temperature, dim=-1)
        probs_BV = top_p_filter(probs_BV, self.top_p)
        return torch.multinomial(probs_BV, 1, generator=self.generator)[:, 0]
