"""Which functions' share of a profile changed between two profiles, and whether that is more than noise.

The one ranking of `bpfprof diff` and of the viewer's span diff. A
function's share is its value over the profile's total, self (where it is
the leaf) and total (anywhere on the stack, once per stack). The change is
in percentage points. Whether a change is real is a two-proportion z-test on
sample counts (a sampled profile is a binomial draw per function), with
Holm's correction over every function and both measures tested, so that
with hundreds of functions chance alone does not name one; a change must
also be at least `min_points` to count (a real but tiny shift is not a
regression worth reading).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from exporters.profile import Profile
from exporters.summary import location_name

ALPHA = 0.05
MIN_POINTS = 1.0


@dataclass
class FunctionValues:
    """Per function: self and total values (shares come from these) and sample counts (the test's input).

    `counts_*` empty means the profile has no count sample type: shares are
    ranked, nothing is tested.
    """

    self_: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    value_total: float = 0
    counts_self: Counter[str] = field(default_factory=Counter)
    counts_total: Counter[str] = field(default_factory=Counter)
    count_total: int = 0


@dataclass(frozen=True)
class Change:
    """One function, one measure ('self' or 'total'): shares in both profiles, the change and its test."""

    function: str
    measure: str
    base_share: float  # fraction of the base profile's total
    new_share: float
    p_value: float | None  # two-sided, before correction; None when not tested
    p_adjusted: float | None  # Holm-adjusted
    significant: bool

    @property
    def points(self) -> float:
        """Change of share in percentage points (positive: more of the profile than before)."""
        return 100 * (self.new_share - self.base_share)


def count_index(profile: Profile, value_index: int) -> int | None:
    """The sample type that counts events for `value_index` (itself when a count): alloc_space ->
    alloc_objects, cpu -> samples. None when the profile has no count type."""
    return count_index_of([(t.type, t.unit) for t in profile.sample_types], value_index)


def count_index_of(types: Sequence[tuple[str, str]], value_index: int) -> int | None:
    """count_index over (type, unit) pairs (the viewer's stored sample types)."""
    if types[value_index][1] == "count":
        return value_index
    counts = [i for i, (_, unit) in enumerate(types) if unit == "count"]
    prefix = types[value_index][0].split("_")[0] + "_"
    same = [i for i in counts if types[i][0].startswith(prefix)]
    return (same or counts or [None])[0]


def _stack_names(stack: tuple) -> tuple[str, set[str]]:
    leaf = location_name(stack[0])
    names = set()
    for loc in stack:
        if loc.frames:
            names.update(f.function or f.system_name for f in loc.frames)
        else:
            names.add(location_name(loc))
    return leaf, names


def function_values(profile: Profile, value_index: int) -> FunctionValues:
    """Self and total per function of one sample type, with the counts of its count type."""
    out = FunctionValues()
    ci = count_index(profile, value_index)
    for s in profile.samples:
        v = s.values[value_index]
        c = s.values[ci] if ci is not None else 0
        out.value_total += v
        out.count_total += c
        if not s.stack or (not v and not c):
            continue
        leaf, names = _stack_names(s.stack)
        out.self_[leaf] += v
        out.counts_self[leaf] += c
        for name in names:
            out.total[name] += v
            out.counts_total[name] += c
    return out


def _p_two_proportions(x1: int, n1: int, x2: int, n2: int) -> float:
    """Two-sided p of the pooled two-proportion z-test (1.0 when nothing varies)."""
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (x2 / n2 - x1 / n1) / se
    return math.erfc(abs(z) / math.sqrt(2))


def _holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (monotone, capped at 1), in the input's order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def rank_changes(base: FunctionValues, new: FunctionValues, alpha: float = ALPHA,
                 min_points: float = MIN_POINTS) -> list[Change]:
    """Every function's self and total change, largest absolute change first (ties: name, measure).

    Significant: Holm-adjusted p below `alpha` and |points| >= `min_points`.
    Untested (p None, never significant) when either profile has no counts.
    """
    rows: list[tuple[str, str, float, float, float | None]] = []
    tested = base.count_total > 0 and new.count_total > 0
    for measure, bv, nv, bc, nc in (("self", base.self_, new.self_, base.counts_self, new.counts_self),
                                    ("total", base.total, new.total, base.counts_total, new.counts_total)):
        for name in sorted(set(bv) | set(nv)):
            bs = bv[name] / base.value_total if base.value_total else 0.0
            ns = nv[name] / new.value_total if new.value_total else 0.0
            p = _p_two_proportions(bc[name], base.count_total, nc[name], new.count_total) if tested else None
            rows.append((name, measure, bs, ns, p))
    adjusted = _holm([r[4] for r in rows]) if tested and rows else [None] * len(rows)
    changes = [Change(name, measure, bs, ns, p, adj,
                      adj is not None and adj < alpha and abs(100 * (ns - bs)) >= min_points)
               for (name, measure, bs, ns, p), adj in zip(rows, adjusted, strict=True)]
    changes.sort(key=lambda c: (-abs(c.points), c.function, c.measure))
    return changes


def change_json(c: Change) -> dict:
    """One change for a page (JSON-able, shares in points)."""
    return {"function": c.function, "measure": c.measure, "base": round(100 * c.base_share, 3),
            "new": round(100 * c.new_share, 3), "points": round(c.points, 3),
            "p": None if c.p_value is None else float(f"{c.p_value:.3g}"),
            "p_adj": None if c.p_adjusted is None else float(f"{c.p_adjusted:.3g}"), "significant": c.significant}
