"""Encode a Profile as Brendan Gregg's folded stacks, the input of flamegraph.pl.

One line per distinct stack, `root;...;leaf count`. The conventions are those
of bcc's `profile -f -a` and stackcollapse-perf.pl --pid, so existing tooling
reads and colours the output:

- the root frame is the task's comm with its pid, `comm-pid`
  (stackcollapse-perf.pl --pid); `[unknown]-pid` when the name is not known;
- then the user frames outermost first, then the kernel frames, each kernel
  frame suffixed `_[k]` (flamegraph.pl --colors=java paints them apart);
- inlined frames are frames of their own, in call order (outer before inner);
- a frame the symbolizer could not resolve is `module+0xoffset`, the offset
  in the mapped file, or `0xaddress` when no mapping is known
  (exporters.profile.unresolved_name, as in every other output);
- stacks that fold to the same line are summed; zero counts are omitted;
  lines are sorted, so the output is stable.
"""

from __future__ import annotations

from collections import Counter

from exporters.profile import KERNEL_MAPPING_PATH, Location, Profile, unresolved_name
from symbolizer.frames import FrameKind

# flamegraph.pl's annotation for kernel frames (bcc profile -a).
KERNEL_SUFFIX = "_[k]"
# A task whose comm we never learned still gets a root frame of its own.
UNKNOWN_COMM = "[unknown]"


def _clean(name: str) -> str:
    # ';' separates frames and a newline ends the record: neither may leak in.
    return name.replace(";", ":").replace("\n", " ")


def _names(loc: Location) -> list[str]:
    """The frames of one location, outermost first."""
    if not loc.frames:
        name = unresolved_name(loc)
        is_kernel = loc.mapping is not None and loc.mapping.path == KERNEL_MAPPING_PATH
        return [name + KERNEL_SUFFIX if is_kernel else name]
    out = []
    for frame in reversed(loc.frames):  # Location.frames is innermost first
        name = _clean(frame.function) or unresolved_name(loc)
        out.append(name + KERNEL_SUFFIX if frame.kind is FrameKind.KERNEL else name)
    return out


def encode_folded(profile: Profile, value_index: int = 0) -> bytes:
    """Folded stacks of one sample value (index into profile.sample_types), UTF-8."""
    counts: Counter[str] = Counter()
    for sample in profile.samples:
        value = sample.values[value_index]
        if not value:
            continue
        key = sample.key
        frames = [f"{_clean(key.thread_name) or UNKNOWN_COMM}-{key.pid}"]
        for loc in reversed(key.stack):  # stacks are leaf first
            frames.extend(_names(loc))
        counts[";".join(frames)] += value
    lines = [f"{stack} {count}\n" for stack, count in sorted(counts.items()) if count]
    return "".join(lines).encode("utf-8")
