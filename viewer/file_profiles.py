"""Profiles loaded from files (`bpfprof view`): into the store under their file's name, and out by type and time.

A loaded profile is every profiles row with its `source` (one row per
process); its samples come out as an Attribution like a span's, so the
flame graph, timeline, diff and pprof download of the span page serve it
unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from exporters.profile import Profile
from viewer.attribution import Attribution, Method, ProfileType
from viewer.store import LoadedProfile, Store


def load(store: Store, named: Sequence[tuple[str, Profile]]) -> int:
    """Store each profile under its name (unique per store); returns the sample events stored."""
    return sum(store.add_profiles([p], source=name) for name, p in named)


def profile_types(lp: LoadedProfile) -> list[ProfileType]:
    return [ProfileType(lp.kind, t, unit) for t, unit in lp.sample_types]


def default_type(lp: LoadedProfile) -> ProfileType:
    """The profile's own default sample type, else the last (pprof's rule: cpu time, inuse_space, delay)."""
    types = profile_types(lp)
    return next((t for t in types if t.sample_type == lp.default_type), types[-1])


def profile_json(lp: LoadedProfile) -> dict:
    return {"id": lp.id, "source": lp.source, "kind": lp.kind, "start_unix_ms": lp.start_ns / 1e6,
            "duration_ms": (lp.end_ns - lp.start_ns) / 1e6, "processes": lp.processes,
            "types": [{"key": t.key, "kind": t.kind, "sample_type": t.sample_type, "unit": t.unit}
                      for t in profile_types(lp)], "default_type": default_type(lp).key}


def samples_of(store: Store, lp: LoadedProfile, type_key: str, window: tuple[int, int] | None = None) -> Attribution:
    """The profile's samples of one type (its default when `type_key` is empty or unknown) inside `window`."""
    types = {t.key: t for t in profile_types(lp)}
    pt = types.get(type_key) or default_type(lp)
    window = window or (lp.start_ns, lp.end_ns)
    rows = store.samples(source=lp.source, window=None if window == (lp.start_ns, lp.end_ns) else window)
    profiles = store.profiles({s.profile_id for s in rows}) if rows else {}
    reason = f"{len(rows)} sample events of {lp.source}"
    return Attribution(Method.PROFILE if rows else Method.NONE, reason if rows else f"no samples of {lp.source} "
                       "in this window", pt, rows, profiles, window)
