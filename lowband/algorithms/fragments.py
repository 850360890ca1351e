"""Streaming DiLoCo's fragments: which parameters synchronise together, chosen for any model.

Fragment p of P is strided over the layers where the model has them (layer l in fragment l % P),
else cut into contiguous runs balanced by bytes; or given as module groups. docs/diloco.md.
"""

from __future__ import annotations

import torch
from torch import nn

from lowband.algorithms.registry import OptionError
from lowband.errors import ConfigError

# Containers of transformer blocks in common model families, treated like `layers` when the
# strided split they give is balanced: GPT-2, Bloom, Falcon (transformer.h); Llama, Mistral,
# Qwen, Gemma (model.layers); GPT-NeoX, Pythia (gpt_neox.layers); OPT (model.decoder.layers).
BLOCK_CONTAINERS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers")
# A detected container's strided split is kept while its largest fragment is at most this many
# times the byte-balanced contiguous split's: the paper's strided pattern spreads every fragment
# over the whole depth, but not at the cost of much larger syncs (GPT-2 124M at P=2 is 66/34).
STRIDED_SLACK = 1.25


def strided_fragments(model: nn.Module, num_fragments: int) -> list[list[nn.Parameter]]:
    """Split the trainable parameters into P fragments, strided over the layers where possible.

    1. A model with a `layers` ModuleList of at least P layers (lowband's Transformer) gets layer l
       in fragment l % P; parameters before the layers (embeddings) join fragment 0 and those
       after (final norm, output head) fragment P-1.
    2. A model with a block container of at least P blocks (`BLOCK_CONTAINERS`: `transformer.h`
       in GPT-2, `model.layers` in HF Llama) is split the same way over its blocks, if the largest
       fragment is within STRIDED_SLACK of step 3's.
    3. Anything else: the parameters in module (depth) order, cut into P contiguous groups whose
       largest holds the fewest bytes possible without splitting a tensor (`balanced_cuts`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if num_fragments < 1:
        raise OptionError(f"{{fragments}} must be at least 1, got {num_fragments}")
    if num_fragments == 1:
        return [params]
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) >= num_fragments:
        return _strided_over(params, layers, num_fragments)
    if len(params) < num_fragments:
        raise OptionError(
            f"{{fragments=}} is more than the model's {len(params)} parameter tensors",
            fragments=num_fragments,
        )
    cuts = balanced_cuts([_nbytes(p) for p in params], num_fragments)
    contiguous = [params[a:b] for a, b in zip(cuts, cuts[1:])]
    for path in BLOCK_CONTAINERS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) >= num_fragments:
            strided = _strided_over(params, blocks, num_fragments)
            worst = max(fragment_balance(contiguous))
            if all(strided) and max(fragment_balance(strided)) <= STRIDED_SLACK * worst:
                return strided
    return contiguous


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def fragment_balance(fragments: list[list[nn.Parameter]]) -> list[float]:
    """Each fragment's share of the parameter bytes (numel * element size); they sum to 1."""
    sizes = [sum(_nbytes(p) for p in frag) for frag in fragments]
    total = sum(sizes)
    return [s / total if total else 0.0 for s in sizes]


def module_fragments(model: nn.Module, groups: list[list[nn.Module]]) -> list[list[nn.Parameter]]:
    """Fragment p: the trainable parameters of the modules in groups[p], in the model's order.

    Every trainable parameter of `model` must be in exactly one group (a tied weight counts
    once, so the modules sharing it belong in one group); else a ConfigError names it.
    """
    name_of = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    group_of: dict[int, int] = {}
    for g, modules in enumerate(groups):
        for module in modules:
            for p in module.parameters():
                if not p.requires_grad:
                    continue
                if id(p) not in name_of:
                    raise ConfigError(
                        f"fragment_modules group {g}: {type(module).__name__} holds a parameter "
                        f"of shape {tuple(p.shape)} that is not the model's"
                    )
                first = group_of.setdefault(id(p), g)
                if first != g:
                    raise ConfigError(
                        f"fragment_modules: parameter {name_of[id(p)]} is in groups {first} and "
                        f"{g}; every trainable parameter must be in exactly one"
                    )
    missing = [n for i, n in name_of.items() if i not in group_of]
    if missing:
        raise ConfigError(
            f"fragment_modules leaves out {len(missing)} trainable parameter(s): "
            + ", ".join(missing[:5])
            + (", ..." if len(missing) > 5 else "")
        )
    frags: list[list[nn.Parameter]] = [[] for _ in groups]
    for p in model.parameters():
        if p.requires_grad:
            frags[group_of[id(p)]].append(p)
    for g, frag in enumerate(frags):
        if not frag:
            raise ConfigError(f"fragment_modules group {g} holds no trainable parameter")
    return frags


def _strided_over(
    params: list[nn.Parameter], layers: nn.ModuleList, num_fragments: int
) -> list[list[nn.Parameter]]:
    """Layer l in fragment l % P; parameters before the first layer's in 0, after it in P-1."""
    frags: list[list[nn.Parameter]] = [[] for _ in range(num_fragments)]
    in_layer = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    seen_layer = False
    for p in params:
        if id(p) in in_layer:
            seen_layer = True
            frags[in_layer[id(p)] % num_fragments].append(p)
        else:
            frags[-1 if seen_layer else 0].append(p)
    return frags


def balanced_cuts(sizes: list[int], parts: int) -> list[int]:
    """Cut `sizes` into `parts` non-empty contiguous runs minimising the largest run's sum.

    Returns the bounds [0, c_1, ..., len(sizes)]; run k is sizes[bounds[k]:bounds[k + 1]]. The optimum C is the
    least capacity at which greedy filling from the left needs at most `parts` runs (feasibility is
    monotone in C, so a binary search over the integers finds it exactly); the runs are then filled
    greedily up to C, each leaving at least one item for every run still to come.
    """
    n = len(sizes)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} items into {parts} non-empty runs")

    def runs_needed(cap: int) -> int:
        runs, load = 1, 0
        for s in sizes:
            if load + s > cap:
                runs, load = runs + 1, 0
            load += s
        return runs

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if runs_needed(mid) <= parts:
            hi = mid
        else:
            lo = mid + 1
    bounds, i = [0], 0
    for k in range(parts - 1):
        load = sizes[i]
        i += 1
        while i < n - (parts - 1 - k) and load + sizes[i] <= lo:
            load += sizes[i]
            i += 1
        bounds.append(i)
    return bounds + [n]
