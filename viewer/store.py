"""The SQLite store of `bpfprof serve`: spans, profiles, their samples and stacks, in one file.

One row per sample event (per timestamp), so a span's window and thread cut
the profile exactly; stacks are stored once each (by digest). Retention drops
whatever was received longest ago: by age (serve's retention thread, once a
minute), and by size after every write that takes the file past `max_bytes`,
so the file never stays over its cap by more than the last request. The database runs in rollback-journal mode so it stays one
file; incremental auto-vacuum gives freed pages back to the file system.

One connection behind one lock: the receivers write, the UI reads, and at the
scale of one machine that is simpler than WAL and readers of their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Frame/Mapping types reach the viewer through exporters, its one dependency (DESIGN.md's arrows).
from exporters.otlp import BuildIdKind, FrameKind
from exporters.profile import Frame, Location, Mapping, Profile, unresolved_name

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id BLOB NOT NULL, span_id BLOB NOT NULL, parent_span_id BLOB NOT NULL,
    name TEXT NOT NULL, service TEXT NOT NULL, kind INTEGER NOT NULL,
    start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, duration_ns INTEGER NOT NULL,
    status_code INTEGER NOT NULL, status_message TEXT NOT NULL,
    pid INTEGER, tid INTEGER, thread_attr TEXT, thread_name TEXT NOT NULL,
    attributes TEXT NOT NULL, resource TEXT NOT NULL, received_ns INTEGER NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spans_by_duration ON spans (duration_ns DESC);
CREATE INDEX IF NOT EXISTS spans_by_received ON spans (received_ns);
CREATE INDEX IF NOT EXISTS spans_by_name ON spans (service, name);
CREATE TABLE IF NOT EXISTS profiles (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, sample_types TEXT NOT NULL,
    period_type TEXT NOT NULL, period INTEGER NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
    pid INTEGER NOT NULL, service TEXT NOT NULL, executable TEXT NOT NULL, received_ns INTEGER NOT NULL,
    source TEXT NOT NULL DEFAULT '', default_type TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS profiles_by_received ON profiles (received_ns);
CREATE TABLE IF NOT EXISTS stacks (id INTEGER PRIMARY KEY, digest BLOB UNIQUE NOT NULL, frames TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    profile_id INTEGER NOT NULL, stack_id INTEGER NOT NULL, tid INTEGER NOT NULL,
    ts_ns INTEGER, vals TEXT NOT NULL, trace_id BLOB, span_id BLOB, thread_name TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_span ON samples (span_id) WHERE span_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS samples_by_tid ON samples (tid, ts_ns);
CREATE INDEX IF NOT EXISTS samples_by_ts ON samples (ts_ns);
CREATE INDEX IF NOT EXISTS samples_by_profile ON samples (profile_id);
"""
# Added after the first release: a store file made before it gets the column on open.
MIGRATIONS = (("profiles", "source", "ALTER TABLE profiles ADD COLUMN source TEXT NOT NULL DEFAULT ''"),
              ("profiles", "default_type", "ALTER TABLE profiles ADD COLUMN default_type TEXT NOT NULL DEFAULT ''"))

SPAN_COLUMNS = ("trace_id", "span_id", "parent_span_id", "name", "service", "kind", "start_ns", "end_ns",
                "duration_ns", "status_code", "status_message", "pid", "tid", "thread_attr", "thread_name",
                "attributes", "resource", "received_ns")


@dataclass(frozen=True)
class SpanRecord:
    """One span as stored. `tid` is the kernel thread id when the span says which (else None);
    `thread_attr` is the raw `thread.id` value as text, kept to say why a span has no tid."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    name: str
    service: str
    kind: int
    start_ns: int
    end_ns: int
    status_code: int = 0
    status_message: str = ""
    pid: int | None = None
    tid: int | None = None
    thread_attr: str | None = None
    thread_name: str = ""
    attributes: dict = field(default_factory=dict)
    resource: dict = field(default_factory=dict)

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass(frozen=True)
class ProfileRow:
    id: int
    kind: str
    sample_types: list[tuple[str, str]]
    period_type: tuple[str, str]
    period: int
    start_ns: int
    end_ns: int
    pid: int
    service: str
    executable: str
    source: str = ""  # the file it was loaded from (`bpfprof view`); "" when received over OTLP


@dataclass(frozen=True)
class LoadedProfile:
    """A profile loaded from a file (`bpfprof view`): its profiles rows (one per process) seen as one."""

    id: int  # the lowest of its rows' ids: the profile's id in URLs
    source: str
    kind: str
    sample_types: list[tuple[str, str]]
    start_ns: int
    end_ns: int
    processes: int
    default_type: str  # the profile's default sample type ("" when it named none)


@dataclass(frozen=True)
class SampleRow:
    """One sample event: the values of its profile's sample types at one time (None: untimed)."""

    profile_id: int
    stack_id: int
    tid: int
    ts_ns: int | None
    values: tuple[int, ...]
    trace_id: bytes | None
    span_id: bytes | None
    thread_name: str


@dataclass(frozen=True)
class SpanFilter:
    """What the spans list shows; empty fields do not filter. Times are Unix ns."""

    service: str = ""
    name: str = ""  # substring
    min_duration_ns: int = 0
    max_duration_ns: int = 0
    since_ns: int = 0
    until_ns: int = 0
    trace_id: bytes = b""
    limit: int = 100
    offset: int = 0


# --- stack serialization: leaf-first locations, innermost frame first ----------


def _encode_stack(stack: tuple[Location, ...]) -> str:
    out = []
    for loc in stack:
        m = loc.mapping
        mapping = None if m is None else [m.path, m.start, m.end, m.file_offset, m.build_id, m.build_id_kind.value]
        frames = [[f.function, f.kind.value, f.file, f.line, f.system_name, f.start_line] for f in loc.frames]
        out.append([loc.address, mapping, frames])
    return json.dumps(out, separators=(",", ":"))


def decode_stack(text: str) -> tuple[Location, ...]:
    """The stack stored by _encode_stack, as Locations again (for pprof downloads)."""
    locations = []
    for address, mapping, frames in json.loads(text):
        m = None
        if mapping is not None:
            path, start, end, offset, build_id, kind = mapping
            m = Mapping(start=start, end=end, file_offset=offset, path=path, build_id=build_id,
                        build_id_kind=BuildIdKind(kind))
        fs = tuple(Frame(function=fn, kind=FrameKind(k), file=file, line=line, system_name=sysname,
                         inlined=i < len(frames) - 1, start_line=start_line)
                   for i, (fn, k, file, line, sysname, start_line) in enumerate(frames))
        locations.append(Location(address=address, mapping=m, frames=fs))
    return tuple(locations)


def _split(total: int, n: int) -> list[int]:
    """`total` over n events, remainder on the last (exporters/otlp does the same)."""
    share, rest = divmod(total, n)
    values = [share] * n
    values[-1] += rest
    return values


class Store:
    """Thread-safe SQLite store. `clock_ns` is injectable so retention can be tested.

    `max_bytes` (None: no cap) is enforced at every write: what was received
    longest ago goes until the used size is under it again.
    """

    def __init__(self, path: Path | str, clock_ns=time.time_ns, max_bytes: int | None = None) -> None:  # noqa: ANN001
        self.path = Path(path)
        self.clock_ns = clock_ns
        self.max_bytes = max_bytes
        self.size_evictions = 0  # writes that took the store past max_bytes and dropped its oldest data
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
        self._db.execute("PRAGMA journal_mode = DELETE")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(SCHEMA)
        for table, column, sql in MIGRATIONS:
            if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(sql)
        self._db.execute("CREATE INDEX IF NOT EXISTS profiles_by_source ON profiles (source) WHERE source != ''")
        self._stack_ids: dict[bytes, int] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writes -------------------------------------------------------------------

    def add_spans(self, spans: Iterable[SpanRecord]) -> int:
        """Insert (or replace: exporters retry) spans in one transaction; returns how many."""
        now = self.clock_ns()
        rows = [(s.trace_id, s.span_id, s.parent_span_id, s.name, s.service, s.kind, s.start_ns, s.end_ns,
                 s.duration_ns, s.status_code, s.status_message, s.pid, s.tid, s.thread_attr, s.thread_name,
                 json.dumps(s.attributes, sort_keys=True), json.dumps(s.resource, sort_keys=True), now)
                for s in spans]
        with self._lock:
            with self._tx():
                self._db.executemany(f"INSERT OR REPLACE INTO spans ({','.join(SPAN_COLUMNS)}) "
                                     f"VALUES ({','.join('?' * len(SPAN_COLUMNS))})", rows)
            self._hold_size()
        return len(rows)

    def add_profiles(self, profiles: Iterable[Profile], source: str = "") -> int:
        """Store decoded profiles, one profiles row per (profile, process); returns sample events stored.

        `source` names the file they were read from (listed by loaded_profiles); "" for OTLP received.
        """
        now = self.clock_ns()
        events = 0
        with self._lock:
            with self._tx():
                events = self._insert_profiles(profiles, now, source)
            self._hold_size()
        return events

    def _insert_profiles(self, profiles: Iterable[Profile], now: int, source: str = "") -> int:
        """The rows of add_profiles (lock held, in its transaction); returns sample events."""
        events = 0
        for p in profiles:
            sample_types = json.dumps([[vt.type, vt.unit] for vt in p.sample_types])
            period_type = json.dumps([p.period_type.type, p.period_type.unit])
            kind = p.kind or (p.default_sample_type or (p.sample_types[0].type if p.sample_types else ""))
            profile_ids: dict[int, int] = {}
            for sample in p.samples:
                pid = sample.key.pid
                if pid not in profile_ids:
                    meta = p.processes.get(pid)
                    cur = self._db.execute(
                        "INSERT INTO profiles (kind, sample_types, period_type, period, start_ns, end_ns, pid,"
                        " service, executable, received_ns, source, default_type) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (kind, sample_types, period_type, p.period, p.start_time_ns,
                         p.start_time_ns + p.duration_ns, pid, meta.service_name if meta else "",
                         (meta.executable_path or meta.name) if meta else "", now, source, p.default_sample_type))
                    profile_ids[pid] = cur.lastrowid
                events += self._add_sample(profile_ids[pid], sample)
        return events

    def _add_sample(self, profile_id: int, sample) -> int:  # noqa: ANN001  (exporters.profile.Sample)
        key = sample.key
        stack_id = self._stack_id(key.stack)
        trace_id = key.link.trace_id if key.link else None
        span_id = key.link.span_id if key.link else None
        ts = sample.timestamps_ns
        if ts:
            columns = [_split(v, len(ts)) for v in sample.values]
            rows = [(profile_id, stack_id, key.tid, t, json.dumps([c[i] for c in columns]), trace_id, span_id,
                     key.thread_name) for i, t in enumerate(ts)]
        else:
            rows = [(profile_id, stack_id, key.tid, None, json.dumps(sample.values), trace_id, span_id,
                     key.thread_name)]
        self._db.executemany("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?)", rows)
        return len(rows)

    def _stack_id(self, stack: tuple[Location, ...]) -> int:
        text = _encode_stack(stack)
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        sid = self._stack_ids.get(digest)
        if sid is None:
            self._db.execute("INSERT OR IGNORE INTO stacks (digest, frames) VALUES (?, ?)", (digest, text))
            sid = self._db.execute("SELECT id FROM stacks WHERE digest = ?", (digest,)).fetchone()[0]
            if len(self._stack_ids) > 200_000:  # bound the cache; the table is the truth
                self._stack_ids.clear()
            self._stack_ids[digest] = sid
        return sid

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN")

        def __exit__(self, exc_type, *_) -> None:  # noqa: ANN001
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> Store._Tx:
        return Store._Tx(self._db)

    # --- reads ----------------------------------------------------------------------

    def _span(self, row: tuple) -> SpanRecord:
        d = dict(zip(SPAN_COLUMNS, row, strict=True))
        d.pop("duration_ns")
        d.pop("received_ns")
        d["attributes"] = json.loads(d["attributes"])
        d["resource"] = json.loads(d["resource"])
        return SpanRecord(**d)

    def spans(self, f: SpanFilter) -> list[SpanRecord]:
        """Spans matching `f`, slowest first."""
        where, args = [], []
        if f.service:
            where.append("service = ?")
            args.append(f.service)
        if f.name:
            where.append("instr(lower(name), lower(?)) > 0")
            args.append(f.name)
        if f.min_duration_ns:
            where.append("duration_ns >= ?")
            args.append(f.min_duration_ns)
        if f.max_duration_ns:
            where.append("duration_ns <= ?")
            args.append(f.max_duration_ns)
        if f.since_ns:
            where.append("end_ns >= ?")
            args.append(f.since_ns)
        if f.until_ns:
            where.append("start_ns <= ?")
            args.append(f.until_ns)
        if f.trace_id:
            where.append("trace_id = ?")
            args.append(f.trace_id)
        sql = f"SELECT {','.join(SPAN_COLUMNS)} FROM spans"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY duration_ns DESC, start_ns LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(sql, [*args, f.limit, f.offset]).fetchall()
        return [self._span(r) for r in rows]

    def trace(self, trace_id: bytes) -> list[SpanRecord]:
        """Every span of one trace, earliest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {','.join(SPAN_COLUMNS)} FROM spans WHERE trace_id = ? "
                                    "ORDER BY start_ns, span_id", (trace_id,)).fetchall()
        return [self._span(r) for r in rows]

    def span(self, trace_id: bytes, span_id: bytes) -> SpanRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {','.join(SPAN_COLUMNS)} FROM spans WHERE trace_id = ? AND span_id = ?",
                                   (trace_id, span_id)).fetchone()
        return self._span(row) if row else None

    def spans_named(self, service: str, name: str, limit: int = 200) -> list[SpanRecord]:
        """The slowest spans with this service and name (the diff view's baseline)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {','.join(SPAN_COLUMNS)} FROM spans WHERE service = ? AND name = ? "
                                    "ORDER BY duration_ns DESC LIMIT ?", (service, name, limit)).fetchall()
        return [self._span(r) for r in rows]

    def services(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT service FROM spans ORDER BY service")]

    def profiles(self, ids: Iterable[int] | None = None) -> dict[int, ProfileRow]:
        sql = ("SELECT id, kind, sample_types, period_type, period, start_ns, end_ns, pid, service, executable, source"
               " FROM profiles")
        with self._lock:
            if ids is None:
                rows = self._db.execute(sql).fetchall()
            else:
                wanted = sorted(set(ids))
                rows = []
                for i in range(0, len(wanted), 500):
                    chunk = wanted[i:i + 500]
                    rows += self._db.execute(f"{sql} WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        return {r[0]: ProfileRow(r[0], r[1], [tuple(x) for x in json.loads(r[2])], tuple(json.loads(r[3])), r[4],
                                 r[5], r[6], r[7], r[8], r[9], r[10]) for r in rows}

    def loaded_profiles(self) -> list[LoadedProfile]:
        """Profiles loaded from files, in the order they were loaded."""
        with self._lock:
            rows = self._db.execute(
                "SELECT min(id), source, kind, sample_types, min(start_ns), max(end_ns), count(*), default_type"
                " FROM profiles WHERE source != '' GROUP BY source ORDER BY min(id)").fetchall()
        return [LoadedProfile(r[0], r[1], r[2], [tuple(x) for x in json.loads(r[3])], r[4], r[5], r[6], r[7])
                for r in rows]

    def samples(self, *, span_ids: Iterable[bytes] = (), tid: int | None = None, pid: int | None = None,
                service: str = "", window: tuple[int, int] | None = None, source: str = "") -> list[SampleRow]:
        """Sample events selected by link (any of `span_ids`), else by thread/process, inside `window`.

        `window` is [start, end) in Unix ns, half-open as OTLP's; an untimed
        sample is in it when its profile's window overlaps. `pid` and `service` together mean either.
        `source`: only the profile loaded from that file.
        """
        where, args = [], []
        if source:
            where.append("p.source = ?")
            args.append(source)
        span_ids = list(span_ids)
        if span_ids:
            where.append(f"s.span_id IN ({','.join('?' * len(span_ids))})")
            args += span_ids
        if tid is not None:
            where.append("s.tid = ?")
            args.append(tid)
        proc = []
        if pid is not None:
            proc.append("p.pid = ?")
            args.append(pid)
        if service:
            proc.append("p.service = ?")
            args.append(service)
        if proc:
            where.append("(" + " OR ".join(proc) + ")")
        if window is not None:
            where.append("((s.ts_ns >= ? AND s.ts_ns < ?) OR (s.ts_ns IS NULL AND p.start_ns < ? AND p.end_ns > ?))")
            args += [window[0], window[1], window[1], window[0]]
        sql = ("SELECT s.profile_id, s.stack_id, s.tid, s.ts_ns, s.vals, s.trace_id, s.span_id, s.thread_name "
               "FROM samples s JOIN profiles p ON p.id = s.profile_id")
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [SampleRow(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), r[5], r[6], r[7]) for r in rows]

    def stacks(self, ids: Iterable[int]) -> dict[int, str]:
        """Stored stack JSON by id (decode with decode_stack, or read the names directly)."""
        wanted = sorted(set(ids))
        out: dict[int, str] = {}
        with self._lock:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
                out.update(self._db.execute(f"SELECT id, frames FROM stacks WHERE id IN ({','.join('?' * len(chunk))})",
                                            chunk).fetchall())
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {t: self._db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("spans", "profiles", "samples", "stacks")}

    def size_bytes(self) -> int:
        """Bytes the file holds in used pages (freed pages are returned by incremental vacuum)."""
        with self._lock:
            return self._used_bytes()

    def _used_bytes(self) -> int:
        page = self._db.execute("PRAGMA page_size").fetchone()[0]
        count = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return (count - free) * page

    # --- retention ----------------------------------------------------------------------

    def enforce_retention(self, max_age_s: float, max_bytes: int) -> dict[str, int]:
        """Drop what was received more than `max_age_s` ago, then the oldest tenth at a time
        until the used size is at most `max_bytes`. Returns rows deleted per table."""
        deleted = {"spans": 0, "profiles": 0}
        cutoff = self.clock_ns() - int(max_age_s * 1e9)
        with self._lock:
            self._delete_before(cutoff, deleted)
            self._shrink_to(max_bytes, deleted)
            # sqlite3's execute() steps a statement once, which frees one page; executescript runs it out.
            self._db.executescript("PRAGMA incremental_vacuum;")
        return deleted

    def _hold_size(self) -> None:
        """After a write (lock held): back under max_bytes, the file's freed pages given back."""
        if self.max_bytes is None or self._used_bytes() <= self.max_bytes:
            return
        deleted = {"spans": 0, "profiles": 0}
        self._shrink_to(self.max_bytes, deleted)
        self._db.executescript("PRAGMA incremental_vacuum;")
        self.size_evictions += 1
        log.info("store over %d bytes: dropped the oldest %d spans and %d profiles", self.max_bytes,
                 deleted["spans"], deleted["profiles"])

    def _shrink_to(self, max_bytes: int, deleted: dict[str, int]) -> None:
        """Drop the oldest tenth at a time until the used size is at most `max_bytes` (lock held)."""
        for _ in range(64):  # each round removes a tenth of the rest: bounded
            if self._used_bytes() <= max_bytes:
                break
            oldest = self._db.execute(
                "SELECT received_ns FROM (SELECT received_ns FROM spans UNION ALL SELECT received_ns FROM profiles)"
                " ORDER BY received_ns LIMIT 1 OFFSET (SELECT (count(*) / 10) FROM "
                "(SELECT 1 FROM spans UNION ALL SELECT 1 FROM profiles))").fetchone()
            if oldest is None:
                break
            self._delete_before(oldest[0] + 1, deleted)

    def _delete_before(self, cutoff_ns: int, deleted: dict[str, int]) -> None:
        with self._tx():
            deleted["spans"] += self._db.execute("DELETE FROM spans WHERE received_ns < ?", (cutoff_ns,)).rowcount
            old = [r[0] for r in self._db.execute("SELECT id FROM profiles WHERE received_ns < ?", (cutoff_ns,))]
            if old:
                self._db.execute("DELETE FROM samples WHERE profile_id IN (SELECT id FROM profiles WHERE received_ns < ?)",
                                 (cutoff_ns,))
                self._db.execute("DELETE FROM profiles WHERE received_ns < ?", (cutoff_ns,))
                self._db.execute("DELETE FROM stacks WHERE id NOT IN (SELECT DISTINCT stack_id FROM samples)")
                self._stack_ids.clear()
                deleted["profiles"] += len(old)


def iter_names(stack_json: str) -> Iterator[str]:
    """Frame names of a stored stack, root first (what a flame graph draws).

    An unresolved address shows as everywhere else: the mapped file's name plus the file offset
    (exporters.profile.unresolved_name).
    """
    locations = json.loads(stack_json)
    for address, mapping, frames in reversed(locations):
        if frames:
            for f in reversed(frames):  # outermost (physical) function first
                yield f[0] or f"{f[4] or '?'}"
        else:
            m = None
            if mapping is not None:
                path, start, end, offset = mapping[:4]
                m = Mapping(start=start, end=end, file_offset=offset, path=path)
            yield unresolved_name(Location(address=address, mapping=m))
