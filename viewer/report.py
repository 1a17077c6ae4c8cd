"""A profile (or the diff of two) as one self-contained HTML file: `record --format html`, `diff --html`, `view`.

The page is viewer/templates/report.html with the flame graph library,
flame.js and report.js inlined and the data in a JSON script element: it
opens from disk with no server and no network. Data is the viewer's compact
flame graph (viewer/flamegraph.py) with one self column per sample type,
so the sample type switch needs no second tree:

    {"title": ..., "facts": [[label, value], ...], "type": "cpu",
     "types": [{"key": "cpu", "unit": "nanoseconds"}, ...],
     "flamegraph": {names, nodes: {name, parent, self[, base]}, total, unit},
     "selves": {"cpu": [...], "samples": [...]}, "changes": [...]}
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from exporters.diff import change_json, count_index, function_values, rank_changes
from exporters.profile import Location, Profile
from exporters.summary import location_name
from viewer.assets import render_template
from viewer.flamegraph import Tree, dumps

MAX_CHANGES = 200  # rows of a diff's table (the largest changes; the rest are noise or nothing)


def _default_index(profile: Profile) -> int:
    return next((i for i, t in enumerate(profile.sample_types) if t.type == profile.default_sample_type),
                len(profile.sample_types) - 1)


def _location_names(loc: Location) -> list[str]:
    """Outermost first (the flame graph's order): a location's frames are innermost (inlined) first."""
    if loc.frames:
        return [f.function or f.system_name for f in reversed(loc.frames)]
    return [location_name(loc)]


def profile_tree(profile: Profile) -> tuple[Tree, list[list[int]]]:
    """The call tree of a profile and one self column per sample type."""
    tree = Tree()
    columns: list[list[int]] = [[0] for _ in profile.sample_types]
    names_of: dict[int, list[str]] = {}
    for s in profile.samples:
        path: list[str] = []
        for loc in reversed(s.stack):
            names = names_of.get(id(loc))
            if names is None:
                names = names_of[id(loc)] = _location_names(loc)
            path.extend(names)
        node = tree.path(path)
        for col in columns:
            col.extend([0] * (len(tree.name) - len(col)))
        for col, v in zip(columns, s.values, strict=False):
            col[node] += v
    for col in columns:
        col.extend([0] * (len(tree.name) - len(col)))
    return tree, columns


def profile_facts(profile: Profile, extra: Sequence[tuple[str, str]] = ()) -> list[list[str]]:
    """What a reader of the page should know of the capture: given facts first, then the profile's own."""
    facts = [[k, v] for k, v in extra]
    given = {k for k, _ in extra}
    if "duration" not in given and profile.duration_ns:
        facts.append(["duration", f"{profile.duration_ns / 1e9:.1f} s"])
    if "frequency" not in given and profile.period and profile.period_type.unit == "nanoseconds":
        facts.append(["frequency", f"{1e9 / profile.period:.0f} Hz"])
    ci = count_index(profile, _default_index(profile)) if profile.sample_types else None
    if "samples" not in given and ci is not None:
        facts.append(["samples", f"{profile.total(ci):,}"])
    facts.extend(["note", c] for c in profile.comments if not ("lost" in given and c.startswith("dropped:")))
    return facts


def report_data(profile: Profile, title: str, facts: Sequence[tuple[str, str]] = ()) -> dict:
    """The page's data for one profile."""
    tree, columns = profile_tree(profile)
    di = _default_index(profile)
    tree.self_ = columns[di]
    fg = tree.to_json(profile.sample_types[di].unit)
    return {"title": title, "facts": profile_facts(profile, facts), "type": profile.sample_types[di].type,
            "types": [{"key": t.type, "unit": t.unit} for t in profile.sample_types],
            "flamegraph": fg, "selves": {t.type: col for t, col in zip(profile.sample_types, columns, strict=True)},
            "changes": None}


def diff_data(base: Profile, new: Profile, value_index: int, title: str,
              facts: Sequence[tuple[str, str]] = ()) -> dict:
    """The page's data for a differential flame graph: NEW's tree, BASE's values scaled to NEW's total as
    the `base` column (equal shares mean no change), and the ranked changes."""
    tree, columns = profile_tree(new)
    tree.self_ = columns[value_index]
    probe_tree_names: dict[int, int] = {}
    base_tree, base_columns = profile_tree(base)
    # Map base nodes onto NEW's tree by their path (made in NEW's tree when new there).
    tree.base = [0.0] * len(tree.name)
    base_values = base_columns[value_index]
    base_total = sum(base_values)
    total = sum(tree.self_)
    scale = total / base_total if base_total else 0.0
    for i in range(1, len(base_tree.name)):
        parent = probe_tree_names[base_tree.parent[i]] if base_tree.parent[i] > 0 else 0
        node = tree.path_from(parent, base_tree.names[base_tree.name[i]])
        probe_tree_names[i] = node
        while len(tree.base) < len(tree.name):
            tree.base.append(0.0)
            tree.self_.append(0)
        tree.base[node] += base_values[i] * scale
    st = new.sample_types[value_index]
    fg = tree.to_json(st.unit, with_base=True)
    fg["base_raw_total"] = base_total
    changes = rank_changes(function_values(base, value_index), function_values(new, value_index))
    return {"title": title, "facts": [[k, v] for k, v in facts], "type": st.type,
            "types": [{"key": st.type, "unit": st.unit}], "flamegraph": fg, "selves": None,
            "changes": [change_json(c) for c in changes[:MAX_CHANGES]]}


def render_report(data: dict) -> bytes:
    """The self-contained page of report_data / diff_data. ConfigError when the npm assets are missing."""
    # "</" cannot end the script element early once escaped; JSON reads "<\/" as "</".
    payload = dumps(data).replace("</", "<\\/")
    return render_template("report.html", {"title": html.escape(data["title"]), "data": payload})


def encode_html(profile: Profile, facts: Sequence[tuple[str, str]] = ()) -> bytes:
    """A profile as its HTML page (the `html` output format)."""
    title = f"bpfprof {profile.kind or 'profile'} profile"
    return render_report(report_data(profile, title, facts))
