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
from viewer.flamegraph import TIMELINE_BUCKETS
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
    """The profile's samples of one type (its default when `type_key` is empty or unknown) inside `window`,
    one row per sample with its events' values summed (no times: timeline() draws those)."""
    types = {t.key: t for t in profile_types(lp)}
    pt = types.get(type_key) or default_type(lp)
    window = window or (lp.start_ns, lp.end_ns)
    rows = store.samples(source=lp.source, window=None if window == (lp.start_ns, lp.end_ns) else window,
                         summed=len(lp.sample_types))
    profiles = store.profiles({s.profile_id for s in rows}) if rows else {}
    if not rows:
        return Attribution(Method.NONE, f"no samples of {lp.source} in this window", pt, rows, profiles, window)
    return Attribution(Method.PROFILE, f"{len(rows)} samples of {lp.source}", pt, rows, profiles, window)


def timeline(store: Store, lp: LoadedProfile, a: Attribution, buckets: int = TIMELINE_BUCKETS) -> dict:
    """flamegraph.timeline's strip for a loaded profile, summed by SQLite (untimed samples left out)."""
    start, end = a.window
    width = max(1, (end - start + buckets - 1) // buckets)
    index = next(i for i, (t, _) in enumerate(lp.sample_types) if t == a.profile_type.sample_type)
    by_bucket = store.value_by_time(lp.source, index, a.window, width)
    return {"bucket_ms": width / 1e6, "values": [by_bucket.get(b, 0) for b in range(buckets)]}
