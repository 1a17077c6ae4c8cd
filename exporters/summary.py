"""Top functions of a Profile, as `go tool pprof -top` ranks them (by flat value)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from exporters.profile import Location, Profile, unresolved_name


@dataclass(frozen=True)
class FunctionShare:
    name: str
    flat: int  # value where the function is the leaf (innermost frame)
    cum: int  # value where the function is anywhere on the stack


def location_name(loc: Location) -> str:
    """Innermost function of a location, or module+0xoffset (unresolved_name) when unresolved."""
    if loc.frames:
        return loc.frames[0].function or loc.frames[0].system_name or unresolved_name(loc)
    return unresolved_name(loc)


def top_functions(profile: Profile, n: int = 10, value_index: int = 0) -> list[FunctionShare]:
    """The n functions with the highest flat value (ties: higher cum first, then name)."""
    flat: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    for s in profile.samples:
        v = s.values[value_index]
        if not s.stack:
            continue
        flat[location_name(s.stack[0])] += v
        names = set()
        for loc in s.stack:
            if loc.frames:
                names.update(f.function or f.system_name for f in loc.frames)
            else:
                names.add(location_name(loc))
        for name in names:
            cum[name] += v
    ranked = sorted(flat, key=lambda k: (-flat[k], -cum[k], k))[:n]
    return [FunctionShare(k, flat[k], cum[k]) for k in ranked]
