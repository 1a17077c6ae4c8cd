"""Trace links against ground truth: fixtures that write down their own spans.

The Go fixture runs spans under pprof labels (trace_id, span_id); the C fixture
publishes OTEP 4947 thread context records around its spans. Each writes one
JSON line per span: ids, wall-clock start and end (ns) and, for the C fixture,
the thread. Every sample of the capture is then placed by its own timestamp:
inside a span it must carry exactly that span's link, outside any span no link.

Samples within GUARD_NS of a span's edge are not judged: the fixture reads the
clock just before attaching and just after detaching, and the sample's
timestamp is taken in BPF a few microseconds after the interrupt, so an edge
sample could fall either way.
"""

from __future__ import annotations

import bisect
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.capture.session import RecordOptions, RecordSession
from exporters.profile import Profile, TraceLink
from fixtures.builder import build_c, build_go

FREQUENCY_HZ = 499
GUARD_NS = 2_000_000
MIN_IN_SPAN = 300  # samples inside spans for the 95 % figure to mean something
MIN_OUTSIDE = 200


@dataclass(frozen=True)
class Span:
    link: TraceLink
    start_ns: int
    end_ns: int
    tid: int | None  # the thread it ran on (C fixture); None: whichever runs the goroutine


@dataclass
class Figures:
    in_span: int = 0
    in_span_right: int = 0
    in_span_wrong: list = None  # type: ignore[assignment]
    outside: int = 0
    outside_linked: int = 0

    @property
    def right_share(self) -> float:
        return self.in_span_right / self.in_span if self.in_span else 0.0

    @property
    def outside_share(self) -> float:
        return self.outside_linked / self.outside if self.outside else 1.0


def read_spans(path: Path) -> list[Span]:
    spans = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        spans.append(Span(TraceLink(bytes.fromhex(d["trace_id"]), bytes.fromhex(d["span_id"])),
                          d["start_ns"], d["end_ns"], d.get("tid")))
    return sorted(spans, key=lambda s: s.start_ns)


def judge(profile: Profile, pid: int, spans: list[Span]) -> Figures:
    """Place every sample of `pid` by timestamp (and thread when spans have one)."""
    by_thread: dict[int | None, list[Span]] = {}
    for s in spans:
        by_thread.setdefault(s.tid, []).append(s)
    starts = {t: [s.start_ns for s in ss] for t, ss in by_thread.items()}
    fig = Figures(in_span_wrong=[])
    for sample in profile.samples:
        key = sample.key
        if key.pid != pid:
            continue
        tkey = key.tid if None not in by_thread else None
        ss, st = by_thread.get(tkey, []), starts.get(tkey, [])
        for ts in sample.timestamps_ns:
            i = bisect.bisect_right(st, ts) - 1
            span = ss[i] if i >= 0 and ts < ss[i].end_ns else None
            near = [s for s in ss[max(i, 0):i + 2] if abs(ts - s.start_ns) < GUARD_NS or abs(ts - s.end_ns) < GUARD_NS]
            if near:
                continue
            if span is not None:
                fig.in_span += 1
                if key.link == span.link:
                    fig.in_span_right += 1
                else:
                    fig.in_span_wrong.append((key.link, key.thread_name))
            else:
                fig.outside += 1
                fig.outside_linked += key.link is not None
    return fig


def capture(command: list[str]) -> tuple[Profile, RecordSession]:
    session = RecordSession(RecordOptions(frequency_hz=FREQUENCY_HZ, command=tuple(command), with_kernel=True))
    session.run(threading.Event())
    assert session.stats.command_exit == 0, "the fixture failed"
    return session.build_profile(), session


def report(name: str, fig: Figures, session: RecordSession) -> str:
    return (f"{name}: {fig.in_span_right}/{fig.in_span} in-span samples with their span's link "
            f"({fig.right_share:.1%}), {fig.outside_linked}/{fig.outside} outside with a link "
            f"({fig.outside_share:.2%}); drops {session.stats.lost('trace_ctx_read_err')} read errors, "
            f"{session.stats.lost('labels_truncated')} truncated; wrong: {fig.in_span_wrong[:5]}")


def check(name: str, fig: Figures, session: RecordSession) -> None:
    print(report(name, fig, session))
    assert fig.in_span >= MIN_IN_SPAN and fig.outside >= MIN_OUTSIDE, report(name, fig, session)
    assert fig.right_share >= 0.95, report(name, fig, session)
    assert fig.outside_share < 0.01, report(name, fig, session)


@pytest.mark.parametrize("stripped", [False, True], ids=["dwarf", "stripped"])
def test_go_labels_link_samples_to_their_span(tmp_path, stripped):
    binary = build_go("labels", stripped=stripped)
    truth = tmp_path / "spans.jsonl"
    profile, session = capture([str(binary), "-out", str(truth), "-spans", "24", "-span-ms", "150",
                                "-gap-ms", "100"])
    spans = read_spans(truth)
    pid = next(s.key.pid for s in profile.samples if s.key.thread_name.startswith("go-labels"))
    fig = judge(profile, pid, spans)
    check(f"go labels ({'stripped' if stripped else 'dwarf'})", fig, session)
    # the labels themselves travel too (pprof labels / OTLP attributes)
    linked = [s for s in profile.samples if s.key.link is not None]
    assert all(dict(s.key.labels).get("span_name") == "work" for s in linked)


OTEL_EXPORT = "-Wl,--export-dynamic-symbol=otel_thread_ctx_v1"
C_BUILDS = {
    "pie": ("-O2", "-g", "-fno-omit-frame-pointer", OTEL_EXPORT),
    "static": ("-O2", "-g", "-fno-omit-frame-pointer", "-static", OTEL_EXPORT),
}


@pytest.mark.parametrize("build", list(C_BUILDS))
def test_otel_thread_context_links_samples_to_their_span(tmp_path, build):
    binary = build_c("otelctx", flags=C_BUILDS[build])
    truth = tmp_path / "spans.jsonl"
    profile, session = capture([str(binary), str(truth), "20", "150", "100", "300"])
    spans = read_spans(truth)
    assert {s.tid for s in spans} and len({s.tid for s in spans}) == 2
    pid = next(s.key.pid for s in profile.samples if s.key.tid in {sp.tid for sp in spans})
    check(f"OTEP 4947 ({build})", judge(profile, pid, spans), session)
