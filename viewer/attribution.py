"""Which samples ran during a span, and how we know.

In order, the first that finds samples of the requested profile type wins:

1. link     samples whose Sample.link names the span or one of its descendants
            (the innermost span is what a Go pprof label or an OTEP 4947 record
            carries, and a child's time is its parent's time too);
2. thread   samples of the span's kernel thread (span attribute thread.id, or
            thread.native_id) inside the span's window, in its process when known;
3. process  samples of its process (resource process.pid, else service.name)
            inside the window.

The window is the span's [start, end], or the part of it the user selected.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from viewer.store import ProfileRow, SampleRow, SpanRecord, Store

ZERO_TRACE_ID = bytes(16)  # a link that knows only the span (a lone span_id pprof label)


class Method(enum.StrEnum):
    LINK = "link"
    THREAD = "thread"
    PROCESS = "process"
    PROFILE = "profile"  # no span: every sample of a profile loaded from a file (`bpfprof view`)
    NONE = "none"


@dataclass(frozen=True)
class ProfileType:
    """A profile kind and one of its sample types: cpu/cpu, heap/inuse_space... (the UI's switch)."""

    kind: str
    sample_type: str
    unit: str

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.sample_type}"


@dataclass(frozen=True)
class Attribution:
    """The samples of one span for one profile type, the method that found them and why."""

    method: Method
    reason: str
    profile_type: ProfileType | None
    samples: list[SampleRow]
    profiles: dict[int, ProfileRow]
    window: tuple[int, int]

    def value_index(self, profile_id: int) -> int:
        """Column of the chosen sample type in a sample of this profile (-1: absent)."""
        p = self.profiles[profile_id]
        for i, (t, _unit) in enumerate(p.sample_types):
            if self.profile_type and t == self.profile_type.sample_type:
                return i
        return -1


def descendants(store: Store, span: SpanRecord) -> list[bytes]:
    """Span ids of the span and every span under it in its trace."""
    children: dict[bytes, list[bytes]] = {}
    for s in store.trace(span.trace_id):
        children.setdefault(s.parent_span_id, []).append(s.span_id)
    out, todo = [], [span.span_id]
    while todo:
        sid = todo.pop()
        if sid in out:
            continue  # a cycle in bad data must not loop
        out.append(sid)
        todo.extend(children.get(sid, ()))
    return out


def _types(samples: list[SampleRow], profiles: dict[int, ProfileRow]) -> list[ProfileType]:
    seen: dict[str, ProfileType] = {}
    for pid in sorted({s.profile_id for s in samples}):
        p = profiles[pid]
        for t, unit in p.sample_types:
            pt = ProfileType(p.kind, t, unit)
            seen.setdefault(pt.key, pt)
    return list(seen.values())


def default_type(types: list[ProfileType]) -> ProfileType | None:
    """cpu time first, then the first type of the first kind found."""
    for pt in types:
        if pt.key == "cpu/cpu":
            return pt
    return types[0] if types else None


class SpanSamples:
    """Runs the three methods once for one span and window, then answers per profile type."""

    def __init__(self, store: Store, span: SpanRecord, window: tuple[int, int] | None = None) -> None:
        self.store, self.span = store, span
        self.window = window or (span.start_ns, span.end_ns)
        self.found: list[tuple[Method, str, list[SampleRow]]] = []
        self.notes: list[str] = []
        self._run()
        ids = {s.profile_id for _, _, rows in self.found for s in rows}
        self.profiles = store.profiles(ids) if ids else {}

    def _run(self) -> None:
        span, store = self.span, self.store
        linked = [s for s in store.samples(span_ids=descendants(store, span), window=self.window)
                  if s.trace_id in (span.trace_id, ZERO_TRACE_ID, None)]
        if linked:
            self.found.append((Method.LINK, f"{len(linked)} samples carry a link to this span or a span under it",
                               linked))
        else:
            self.notes.append("no sample carries a link to this span")
        if span.tid is not None:
            rows = store.samples(tid=span.tid, pid=span.pid, window=self.window)
            if rows:
                self.found.append((Method.THREAD, f"{len(rows)} samples of thread {span.tid}"
                                   + (f" of process {span.pid}" if span.pid is not None else "")
                                   + " inside the span's window", rows))
            else:
                self.notes.append(f"no sample of thread {span.tid} inside the span's window")
        elif span.thread_attr is not None:
            self.notes.append(f"thread.id {span.thread_attr} is not a kernel thread id (set thread.id or "
                              "thread.native_id to threading.get_native_id() / gettid())")
        else:
            self.notes.append("the span has no thread.id attribute")
        if span.pid is not None or span.service:
            rows = store.samples(pid=span.pid, service=span.service, window=self.window)
            what = " or ".join(x for x in (f"process {span.pid}" if span.pid is not None else "",
                                            f"service {span.service!r}" if span.service else "") if x)
            if rows:
                self.found.append((Method.PROCESS, f"{len(rows)} samples of {what} inside the span's window", rows))
            else:
                self.notes.append(f"no sample of {what} inside the span's window")

    def types(self) -> list[ProfileType]:
        """Every profile type some method found samples of, in a stable order."""
        out: dict[str, ProfileType] = {}
        for _, _, rows in self.found:
            for pt in _types(rows, self.profiles):
                out.setdefault(pt.key, pt)
        return sorted(out.values(), key=lambda pt: (pt.kind != "cpu", pt.kind, pt.sample_type))

    def for_type(self, type_key: str = "") -> Attribution:
        """The first method's samples of that type (the default type when empty)."""
        types = {pt.key: pt for pt in self.types()}
        pt = types.get(type_key) or default_type(list(types.values()))
        if pt is not None:
            for method, reason, rows in self.found:
                chosen = [s for s in rows if self.profiles[s.profile_id].kind == pt.kind
                          and any(t == pt.sample_type for t, _ in self.profiles[s.profile_id].sample_types)]
                if chosen:
                    earlier = [f"{m.value}: none of type {pt.key}" for m, _, _ in self.found[:self.found.index(
                        (method, reason, rows))]]
                    why = "; ".join([reason, *self.notes, *earlier])
                    return Attribution(method, why, pt, chosen, self.profiles, self.window)
        return Attribution(Method.NONE, "; ".join(self.notes) or "no samples", pt, [], self.profiles, self.window)
