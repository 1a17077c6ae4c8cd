"""One interval's samples of a family, interned as they arrive.

Records that differ only in their time and value (the same process image,
thread, CPU, stacks, trace context and aux word) are one entry: the first
such record, kept, and an array with the time and value of every event.
A sample costs a key, one dict lookup and an append; what is kept per
sample is 16 bytes, not a record object, so an interval of a busy host holds
its distinct stacks, not its samples (issue #12). Profiles are built from the
entries (profile_builder.add_records), each resolved once.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from agent.bpfload.records import RawRecord


def identity(rec: RawRecord) -> tuple:
    """What makes two records one entry: all but the time and value.

    The image is named by its object (alive while the entry keeps its record):
    a pid that exec'd has other code at the same addresses. An unwound stack's
    `exact` set changes how its addresses resolve. A trace link is its bytes:
    comparing them is half the cost of the dataclass's __eq__ in a lookup.
    """
    ips = rec.user_ips
    link = rec.otel_link
    return (rec.kind, rec.pid, rec.tid, rec.cpu, rec.aux, rec.thread_name, rec.kernel_ips, ips,
            getattr(ips, "exact", None), id(rec.image), rec.go_labels, rec.go_labels_truncated,
            None if link is None else link.trace_id + link.span_id, rec.py_frames)


class SampleStore:
    """Interned samples: `records[i]` stands for the events in `events[i]`, (time, value) pairs one after
    the other (CLOCK_MONOTONIC ns; the record's value each time), so that a repeat's 16 header bytes go in
    with one frombytes (CapturePipeline.deliver_bufs). Only the polling thread adds; the builder reads
    after the interval is cut."""

    __slots__ = ("_index", "records", "events", "count")

    def __init__(self) -> None:
        self._index: dict[tuple, int] = {}
        self.records: list[RawRecord] = []
        self.events: list[array] = []
        self.count = 0  # events added

    def add(self, rec: RawRecord) -> int:
        """One event: its entry's array grows, or the record becomes a new entry. Returns the entry's index."""
        key = identity(rec)
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.records)
            self.records.append(rec)
            self.events.append(array("q"))
        self.events[i].extend((rec.ktime_ns, rec.value))
        self.count += 1
        return i

    def repeat(self, i: int, ktime_ns: int, value: int) -> None:
        """One more event of entry `i` (a record identical to its first but for time and value)."""
        self.events[i].extend((ktime_ns, value))
        self.count += 1

    def __len__(self) -> int:
        return self.count

    @property
    def times(self) -> list[array]:
        """Each entry's event times."""
        return [ev[0::2] for ev in self.events]

    def entries(self) -> Iterator[tuple[RawRecord, array, array]]:
        """(first record, times, values) of each distinct entry, in arrival order."""
        for rec, ev in zip(self.records, self.events, strict=True):
            yield rec, ev[0::2], ev[1::2]

    @classmethod
    def of(cls, records: list[RawRecord]) -> SampleStore:
        """A store holding `records` (tests, replays)."""
        store = cls()
        for rec in records:
            store.add(rec)
        return store
