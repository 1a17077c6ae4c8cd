"""Flame graph data as compact JSON: one string table, node fields by column, keys sorted.

    {"names": ["all", "main", ...],
     "nodes": {"name": [0, 1, ...], "parent": [-1, 0, ...], "self": [0, 12, ...]},
     "total": 120, "unit": "nanoseconds"}

Node 0 is the root. A node is one function at one position of the call path
(root first); `self` is the value of samples whose stack ends there. The page
builds children and totals from the columns. A diff adds a `base` column: the
baseline's self values scaled to this profile's total, so equal shares mean
no change.
"""

from __future__ import annotations

import json
from collections import Counter

from exporters.diff import FunctionValues, change_json, count_index_of, rank_changes
from exporters.profile import Profile, SampleKey, TraceLink, ValueType
from viewer.attribution import Attribution
from viewer.store import Store, decode_stack, iter_names

ROOT_NAME = "all"
TIMELINE_BUCKETS = 60


def dumps(obj: object) -> str:
    """The one JSON encoding of the viewer: compact, keys sorted (stable output)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class Tree:
    """A call tree being filled: nodes by (parent, name) with self values."""

    def __init__(self) -> None:
        self.names: list[str] = [ROOT_NAME]
        self._name_ids = {ROOT_NAME: 0}
        self.name: list[int] = [0]
        self.parent: list[int] = [-1]
        self.self_: list[int] = [0]
        self.base: list[float] = [0.0]
        self._children: dict[tuple[int, int], int] = {}
        self._extra: list[list[float]] = []

    def column(self) -> list[float]:
        """A new value column, kept as long as the tree as nodes are made."""
        col = [0.0] * len(self.name)
        self._extra.append(col)
        return col

    def _name(self, s: str) -> int:
        i = self._name_ids.get(s)
        if i is None:
            i = self._name_ids[s] = len(self.names)
            self.names.append(s)
        return i

    def path(self, names: list[str]) -> int:
        """The node at the end of a root-first path of function names, made as needed."""
        node = 0
        for s in names:
            node = self.path_from(node, s)
        return node

    def path_from(self, node: int, name: str) -> int:
        """The child of `node` named `name`, made as needed."""
        key = (node, self._name(name))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = len(self.name)
            self.name.append(key[1])
            self.parent.append(node)
            self.self_.append(0)
            self.base.append(0.0)
            for col in self._extra:
                col.append(0.0)
        return child

    def to_json(self, unit: str, with_base: bool = False) -> dict:
        out = {"names": self.names, "nodes": {"name": self.name, "parent": self.parent, "self": self.self_},
               "total": sum(self.self_), "unit": unit}
        if with_base:
            out["nodes"]["base"] = [round(b, 3) for b in self.base]
            out["base_total"] = round(sum(self.base), 3)
        return out


MAX_CHANGES = 100  # rows of a span diff's ranking


def _per_function(tree: Tree, column: list[float]) -> tuple[Counter, Counter, float]:
    """Self and total per function of one column (total: once per path, as flame.js's top table), and the sum."""
    self_: Counter[str] = Counter()
    total_of: Counter[str] = Counter()
    total = list(column)
    for i in range(len(tree.name) - 1, 0, -1):
        total[tree.parent[i]] += total[i]
    on_path: list[frozenset[int]] = [frozenset()] * len(tree.name)
    for i in range(1, len(tree.name)):
        name_id = tree.name[i]
        above = on_path[tree.parent[i]]
        on_path[i] = above if name_id in above else above | {name_id}
        name = tree.names[name_id]
        if column[i]:  # no entry for nothing: the test's correction counts the functions tested
            self_[name] += column[i]
        if name_id not in above and total[i]:
            total_of[name] += total[i]
    return self_, total_of, total[0]


def tree_values(tree: Tree, column: list[float], counts: list[float] | None) -> FunctionValues:
    """Self and total per function of one column of a tree, with the sample counts of `counts` (the
    diff's test runs on those; None: no count type, nothing is tested). As exporters.diff.function_values."""
    out = FunctionValues()
    out.self_, out.total, out.value_total = _per_function(tree, column)
    if counts is not None:
        cs, ct, n = _per_function(tree, counts)
        out.counts_self.update({k: round(v) for k, v in cs.items()})
        out.counts_total.update({k: round(v) for k, v in ct.items()})
        out.count_total = round(n)
    return out


def _stack_names(store: Store, stack_ids: set[int]) -> dict[int, list[str]]:
    return {sid: list(iter_names(text)) for sid, text in store.stacks(stack_ids).items()}


def _fill(tree: Tree, store: Store, a: Attribution, column: list, counts: list | None = None) -> int:
    """Add an attribution's values to a column of the tree (and, with `counts`, the values of the sample
    type that counts its events: cpu -> samples); returns the total added."""
    names = _stack_names(store, {s.stack_id for s in a.samples})
    total = 0
    count_of: dict[int, int | None] = {}
    for s in a.samples:
        i = a.value_index(s.profile_id)
        if i < 0 or i >= len(s.values):
            continue
        node = tree.path(names.get(s.stack_id, ["[stack lost]"]))
        v = s.values[i]
        total += v
        column[node] += v
        if counts is not None:
            ci = count_of.get(s.profile_id, -1)
            if ci == -1:
                ci = count_of[s.profile_id] = count_index_of(a.profiles[s.profile_id].sample_types, i)
            if ci is not None and ci < len(s.values):
                counts[node] += s.values[ci]
    return total


def flamegraph(store: Store, a: Attribution) -> dict:
    """The compact flame graph of an attribution's samples (empty tree when none)."""
    tree = Tree()
    _fill(tree, store, a, tree.self_)
    return tree.to_json(a.profile_type.unit if a.profile_type else "")


def diff(store: Store, target: Attribution, baselines: list[Attribution]) -> dict:
    """Target's flame graph with a `base` column: the baselines summed, scaled to the target's total; and
    `changes`, ranked by exporters/diff.py as `bpfprof diff` ranks them (tested on the sample counts)."""
    tree = Tree()
    counts, base_counts, raw_base = tree.column(), tree.column(), tree.column()
    total = _fill(tree, store, target, tree.self_, counts)
    base_total = sum(_fill(tree, store, b, raw_base, base_counts) for b in baselines)
    scale = total / base_total if base_total else 0.0
    tree.base = [v * scale for v in raw_base]
    unit = target.profile_type.unit if target.profile_type else ""
    out = tree.to_json(unit, with_base=True)
    out["base_raw_total"] = base_total
    tested = any(counts) and any(base_counts)
    changes = rank_changes(tree_values(tree, raw_base, base_counts if tested else None),
                           tree_values(tree, [float(v) for v in tree.self_], counts if tested else None))
    out["changes"] = [change_json(c) for c in changes[:MAX_CHANGES]]
    return out


def timeline(a: Attribution, buckets: int = TIMELINE_BUCKETS) -> dict:
    """Value per time bucket over the window (untimed samples are left out): the range selector's strip."""
    start, end = a.window
    width = max(1, (end - start + buckets - 1) // buckets)
    values = [0] * buckets
    for s in a.samples:
        i = a.value_index(s.profile_id)
        if s.ts_ns is None or i < 0 or i >= len(s.values):
            continue
        b = min(buckets - 1, max(0, (s.ts_ns - start) // width))
        values[b] += s.values[i]
    return {"bucket_ms": width / 1e6, "values": values}


def to_profile(store: Store, a: Attribution) -> Profile:
    """The attribution's samples as a neutral Profile (every sample type of the kind), for pprof."""
    stacks = {sid: decode_stack(text) for sid, text in store.stacks({s.stack_id for s in a.samples}).items()}
    first = a.profiles[a.samples[0].profile_id] if a.samples else None
    sample_types = [ValueType(t, u) for t, u in first.sample_types] if first else []
    period_type = ValueType(*first.period_type) if first else ValueType("", "")
    default = a.profile_type.sample_type if a.profile_type else ""
    profile = Profile(sample_types=sample_types, period_type=period_type, period=first.period if first else 0,
                      start_time_ns=a.window[0], duration_ns=a.window[1] - a.window[0],
                      default_sample_type=default, kind=a.profile_type.kind if a.profile_type else "")
    profile.comments.append(f"bpfprof serve: method={a.method.value}: {a.reason}")
    for s in a.samples:
        p = a.profiles[s.profile_id]
        if [ValueType(t, u) for t, u in p.sample_types] != sample_types:
            continue  # another layout of the same kind: pprof has one set of sample types
        link = TraceLink(s.trace_id, s.span_id) if s.span_id else None
        key = SampleKey(stack=stacks.get(s.stack_id, ()), pid=p.pid, tid=s.tid, thread_name=s.thread_name, link=link)
        profile.add(key, list(s.values))
    return profile
