"""Question: how far from the honest mean does each robust rule land under each attack, and does
any input make a rule crash or return a non-finite update?

    python benchmarks/attack_table.py [--seeds 5] [--rounds 3] [--append]

The problem is fixed and small, so every rule meets every attack in a few minutes on 2 cores:
n = 10 workers, d = 1000, honest updates drawn i.i.d. from N(1, I) (fp32, as the workers'
all-gather carries them), f = 1, 2, 3 Byzantine workers placed first, last or at random ranks.

- Rules: lowband.robust.get_aggregator with f: mean (the baseline, tolerating nothing), median,
  trimmed mean, Krum with n - f - 2 neighbours (the paper, `--krum-neighbours paper`) and n - f - 1
  (byzfl), Multi-Krum, Bulyan (only where n >= 4f + 3: f = 1), geometric median, centered
  clipping (stateful, as in training: it carries its reference from round to round), Flag.
- Attacks: lowband's (lowband.robust.attacks: sign-flip, ipm, alie, gaussian, random, nan, inf),
  "huge" (every entry 1e19: finite, but its squared norm overflows fp32 at d = 1000, the third
  input of issue #20), and byzfl's optimal attacks (Opt-IPM, Opt-ALIE: a line search over the
  attack factor that maximises this very rule's error, with no pre-aggregation) when the byzfl
  package can be loaded; "none" is every worker honest.
- One trial: `--rounds` rounds, fresh honest updates each, the attack in every round, one rule
  object for the trial; the figure is the relative error |out - honest mean| / |honest mean| of
  the last round, averaged over `--seeds` trials. A rule that raises is "crash"; an output with a
  NaN or an inf in any round is "non-finite" (both are counted, and shown instead of a number).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import itertools
import math
import shlex
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results  # noqa: E402

from lowband.robust import apply_attack, get_aggregator, get_attack  # noqa: E402

RULES = {  # label -> (get_aggregator name, options)
    "mean": ("mean", {}),
    "median": ("median", {}),
    "trimmed mean": ("trimmed-mean", {}),
    "krum (n-f-2)": ("krum", {}),
    "krum (n-f-1)": ("krum", {"slack": 1}),
    "multi-krum": ("multi-krum", {}),
    "bulyan": ("bulyan", {}),
    "geomed": ("geomed", {}),
    "centered clipping": ("cc", {}),
    "flag": ("flag", {}),
}
LOWBAND_ATTACKS = ["sign-flip", "ipm", "alie", "gaussian", "random", "nan", "inf"]
PLACEMENTS = ["first", "last", "random"]


def load_byzfl_attacks():
    """byzfl.attacks, or None. byzfl's package __init__ imports its federated framework, which
    needs torchvision (none on PyPI for a CPU-only torch): load the submodule under a bare parent
    package, as tests/test_robust.py does."""
    spec = importlib.util.find_spec("byzfl")
    if spec is None:
        return None
    saved = sys.modules.get("byzfl")
    stub = types.ModuleType("byzfl")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["byzfl"] = stub
    try:
        return importlib.import_module("byzfl.attacks")
    except ImportError:
        return None
    finally:
        if saved is None:
            sys.modules.pop("byzfl", None)
        else:
            sys.modules["byzfl"] = saved


def make_attack(name: str, rule, f: int, byzfl):
    """attack(honest_HV, f, generator=None) -> f x V."""
    if name in LOWBAND_ATTACKS:
        return get_attack(name)
    if name == "huge":
        return lambda h, k, generator=None: torch.full((k, h.shape[1]), 1e19, dtype=h.dtype)
    cls = {
        "opt-ipm": byzfl.Optimal_InnerProductManipulation,
        "opt-alie": byzfl.Optimal_ALittleIsEnough,
    }
    # The line search calls the rule on a copy, so a stateful rule's reference is not advanced.
    opt = cls[name](agg=lambda v: copy.deepcopy(rule)(v), pre_agg_list=[], f=f)
    return lambda h, k, generator=None: opt(h).to(h.dtype).unsqueeze(0).expand(k, -1).clone()


def attackers(n: int, f: int, placement: str, gen: torch.Generator) -> list[int]:
    if placement == "first":
        return list(range(f))
    if placement == "last":
        return list(range(n - f, n))
    return sorted(torch.randperm(n, generator=gen)[:f].tolist())


def trial(label: str, attack: str, f: int, placement: str, seed: int, args, byzfl) -> float | str:
    """Relative error of the last round, or "crash" / "non-finite"."""
    name, opts = RULES[label]
    rule = get_aggregator(name, f=0 if name == "mean" else f, n=args.n, **opts)
    gen = torch.Generator().manual_seed(seed)
    bad = [] if attack == "none" else attackers(args.n, f, placement, gen)
    hit = None if attack == "none" else make_attack(attack, rule, f, byzfl)
    error: float | str = math.nan
    for _ in range(args.rounds):
        honest = torch.randn(args.n, args.d, generator=gen) + 1.0
        x = honest if hit is None else apply_attack(honest, bad, hit, gen)
        ref = honest[[i for i in range(args.n) if i not in bad]].mean(0)
        try:
            out = rule(x)
        except Exception:  # noqa: BLE001 - what we count
            return "crash"
        if not torch.isfinite(out).all():
            return "non-finite"
        error = float((out.double() - ref.double()).norm() / ref.double().norm())
    return error


def applies(label: str, n: int, f: int) -> bool:
    return RULES[label][0] != "bulyan" or n >= 4 * f + 3


def number(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.2g}"


def cell(results: list[float | str]) -> str:
    bad = [r for r in results if isinstance(r, str)]
    if bad:
        return f"{bad[0]} x{len(bad)}"
    return number(sum(results) / len(results))


# What issue #20 measured before the fix, quoted from it (no figure here is re-measured "before"):
# (rule, attacks, f, what broke)
BEFORE = [
    ("geomed", ("nan", "inf", "huge"), 1, "all-NaN output, silently"),
    ("centered clipping", ("nan", "inf", "huge"), 1,
     "NaN, then NaN in every later round (the NaN became its reference)"),
    ("flag", ("nan", "inf", "huge"), 1, "crash: `linalg.eigh ... failed to converge`"),
]  # fmt: skip


def before_and_now(results: dict) -> str:
    """The inputs issue #20 found broken, and what the same rules give on them now."""

    def at(label, attack, f) -> str:
        return ", ".join(f"{pl} {cell(results[(label, attack, f, pl)])}" for pl in PLACEMENTS)

    lines = ["| rule | input | before (issue #20) | now: relative error by placement |"]
    lines.append("|---|---|---|---|")
    for rule, attacks, f, broke in BEFORE:
        for attack in attacks:
            lines.append(
                f"| {rule} | one {attack} update (f = {f}) | {broke} | {at(rule, attack, f)} |"
            )
    for label, was in (("krum (n-f-2)", "1.42"), ("krum (n-f-1)", "0.86")):
        lines.append(
            f"| {label} | identical ALIE attackers, f = 3 | {was} | {at(label, 'alie', 3)} |"
        )
    lines.append(
        "| bulyan | placement of f = 1 attacker | ties went to the lowest index, so with the "
        "attackers always last the honest workers won them | alie: "
        f"{at('bulyan', 'alie', 1)}; sign-flip: "
        f"{at('bulyan', 'sign-flip', 1)} |"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--d", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    byzfl = load_byzfl_attacks()
    attacks = ["none", *LOWBAND_ATTACKS, "huge"] + (["opt-ipm", "opt-alie"] if byzfl else [])
    t0 = time.perf_counter()
    # results[(rule, attack, f, placement)] = one entry per seed
    results: dict[tuple, list] = {}
    for label, attack, f in itertools.product(RULES, attacks, (1, 2, 3)):
        if not applies(label, args.n, f):
            continue
        for placement in ["last"] if attack == "none" else PLACEMENTS:
            results[(label, attack, f, placement)] = [
                trial(label, attack, f, placement, 1000 * f + s, args, byzfl)
                for s in range(args.seeds)
            ]
    seconds = time.perf_counter() - t0

    def worst(label, attack, f) -> str:
        """The worst placement's figure (a failure beats any number)."""
        if not applies(label, args.n, f):
            return "n/a"
        cells = [results[k] for k in results if k[:3] == (label, attack, f)]
        failed = [c for c in cells if any(isinstance(r, str) for r in c)]
        if failed:
            return cell(failed[0])
        return max((cell(c) for c in cells), key=float)

    def spread(label) -> str:
        """Largest difference between placements' mean errors, over attacks and f."""
        gaps = []
        for attack, f in itertools.product(attacks[1:], (1, 2, 3)):
            cells = [results.get((label, attack, f, pl)) for pl in PLACEMENTS]
            if all(c is not None and not any(isinstance(r, str) for r in c) for c in cells):
                means = [sum(c) / len(c) for c in cells]
                gaps.append(max(means) - min(means))
        return number(max(gaps)) if gaps else "n/a"

    head = ["rule \\ attack (f = 1 / 2 / 3)", *attacks, "placement spread"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in RULES:
        row = [" / ".join(worst(label, a, f) for f in (1, 2, 3)) for a in attacks]
        lines.append(f"| {label} | " + " | ".join(row) + f" | {spread(label)} |")
    trials = sum(len(v) for v in results.values())
    failures = sum(isinstance(r, str) for v in results.values() for r in v)
    robust_failures = sum(
        isinstance(r, str) for k, v in results.items() if k[0] != "mean" for r in v
    )
    summary = (
        f"{len(results)} (rule, attack, f, placement) cells x {args.seeds} seeds = {trials} "
        f"trials of {args.rounds} rounds in {seconds:.0f} s; crashes or non-finite outputs: "
        f"{failures} in all, {robust_failures} from the robust rules (the mean is the baseline)"
    )
    table = "\n".join(lines) + "\n\n" + summary
    table += "\n\n" + before_and_now(results)
    print(table)
    if args.append:
        command = "python benchmarks/attack_table.py " + shlex.join(sys.argv[1:])
        append_results(
            f"Attack table: every robust rule vs every attack (n = {args.n}, d = {args.d}, "
            "f = 1..3, placement first/last/random)",
            command.strip(),
            table,
        )


if __name__ == "__main__":
    main()
