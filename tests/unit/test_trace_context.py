"""Trace context without a kernel: record trailers, labels -> links, the per-process registry."""

from __future__ import annotations

import ctypes
import os
import struct

from agent.bpfload.records import (
    LABEL_VALUE_LEN,
    CtxKind,
    GoLabels,
    LabelsForm,
    ProcFlag,
    RecordKind,
    TraceCtx,
    parse_record,
)
from agent.go.layouts import VERSION_TABLE, dwarf_offsets, layout_for
from agent.probes.profile_builder import ZERO_TRACE_ID, link_from_labels, trace_context
from agent.tracectx.registry import TraceContextRegistry
from exporters.profile import TraceLink
from fixtures.builder import build_c, build_go
from symbolizer.elf import ElfFile

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def _header(n_ips: int) -> bytes:
    return struct.pack("<IIIIQQQHHhh16s", RecordKind.CPU, 10, 11, 0, 5, 1, 0, 0, n_ips, 0, 0, b"w") + \
        struct.pack(f"<{n_ips}Q", *range(0x1000, 0x1000 + n_ips))


def _go_trailer(pairs: list[tuple[str, str]], total: int | None = None, cut: int = 0) -> bytes:
    t = TraceCtx()
    t.kind = CtxKind.GO_LABELS
    t.go.count, t.go.total, t.go.cut = len(pairs), total if total is not None else len(pairs), cut
    for i, (k, v) in enumerate(pairs):
        lab = t.go.labels[i]
        lab.key_len, lab.value_len = len(k), len(v)
        lab.key, lab.value = k.encode()[:32], v.encode()[:LABEL_VALUE_LEN]
    t.size = 8 + GoLabels.labels.offset + len(pairs) * 104
    return bytes(t)[:t.size]


def test_record_without_trailer_has_no_context():
    r = parse_record(_header(3))
    assert r.user_ips == (0x1000, 0x1001, 0x1002) and r.go_labels == () and r.otel_link is None


def test_go_labels_trailer():
    r = parse_record(_header(2) + _go_trailer([("span_id", SPAN), ("trace_id", TRACE)]))
    assert r.user_ips == (0x1000, 0x1001)
    assert r.go_labels == (("span_id", SPAN), ("trace_id", TRACE)) and not r.go_labels_truncated
    assert trace_context(r)[1] == TraceLink(bytes.fromhex(TRACE), bytes.fromhex(SPAN))


def test_cut_labels_are_dropped_and_flagged():
    long = "x" * (LABEL_VALUE_LEN + 1)
    trailer = bytearray(_go_trailer([("k", long), ("span_id", SPAN)], total=5, cut=1))
    r = parse_record(_header(0) + bytes(trailer))
    assert r.go_labels == (("span_id", SPAN),) and r.go_labels_truncated


def test_otel_trailer_is_the_link_and_wins_over_labels():
    t = TraceCtx()
    t.kind, t.size = CtxKind.OTEL, 8 + ctypes.sizeof(t.otel)
    t.otel.trace_id[:] = bytes.fromhex(TRACE)
    t.otel.span_id[:] = bytes.fromhex(SPAN)
    r = parse_record(_header(1) + bytes(t)[:t.size])
    assert r.otel_link == TraceLink(bytes.fromhex(TRACE), bytes.fromhex(SPAN))
    assert trace_context(r)[1] == r.otel_link


def test_links_from_labels():
    assert link_from_labels([("trace_id", TRACE), ("span_id", SPAN)]) == TraceLink(bytes.fromhex(TRACE),
                                                                                    bytes.fromhex(SPAN))
    assert link_from_labels([("span_id", SPAN)]) == TraceLink(ZERO_TRACE_ID, bytes.fromhex(SPAN))
    assert link_from_labels([("trace_id", TRACE)]) is None
    assert link_from_labels([("span_id", "0" * 16)]) is None  # the W3C invalid span id
    assert link_from_labels([("span_id", "not-hex-not-hex!")]) is None
    assert link_from_labels([("trace_id", "abc"), ("span_id", SPAN)]) == TraceLink(ZERO_TRACE_ID,
                                                                                    bytes.fromhex(SPAN))


def test_go_layout_dwarf_agrees_with_the_version_table():
    for stripped in (False, True):
        layout = layout_for(ElfFile(build_go("labels", stripped=stripped)))
        assert layout is not None and layout.source == ("table" if stripped else "dwarf")
        vt = tuple(int(x) for x in layout.version.removeprefix("go").split(".")[:2])
        assert (layout.g_m, layout.m_curg, layout.g_labels) == VERSION_TABLE[vt]
        assert layout.labels_form == (LabelsForm.SLICE if vt >= (1, 24) else LabelsForm.MAP)
        assert layout.tls_g == -8


def _fake_proc(tmp_path, pid: int, exe) -> None:
    d = tmp_path / str(pid)
    d.mkdir(exist_ok=True)
    link = d / "exe"
    if link.is_symlink():
        link.unlink()
    os.symlink(exe, link)


def test_registry_writes_once_per_pid_and_follows_exec(tmp_path):
    written: dict[int, object] = {}
    now = [0.0]
    reg = TraceContextRegistry(lambda pid, v: written.__setitem__(pid, v), proc_root=str(tmp_path),
                               clock=lambda: now[0])
    _fake_proc(tmp_path, 7, "/bin/sh")
    reg.observe(7, "sh")
    assert 7 not in written  # nothing to read in a shell: no entry
    _fake_proc(tmp_path, 7, build_go("labels", stripped=True))  # exec, same pid
    reg.observe(7, "sh")  # same name, not yet due: no look
    assert 7 not in written
    reg.observe(7, "go-labels")  # renamed by exec: looked at again
    v = written[7]
    assert v.flags == ProcFlag.GO and (v.g_m, v.m_curg, v.g_labels) == VERSION_TABLE[(1, 27)]
    _fake_proc(tmp_path, 8, build_c("otelctx", flags=("-O2", "-Wl,--export-dynamic-symbol=otel_thread_ctx_v1")))
    reg.observe(8)
    assert written[8].flags == ProcFlag.OTEL and written[8].otel_tls < 0
    _fake_proc(tmp_path, 8, "/bin/sh")
    now[0] += 5  # due for a re-check: the entry goes
    reg.observe(8)
    assert written[8] is None
    reg.close()


def test_dwarf_is_read_only_for_a_go_release_the_table_does_not_know(tmp_path, monkeypatch):
    """Reading a Go binary's DWARF costs seconds of CPU on a busy host: a release the version table knows
    is served from the table alone; one it does not know gets its offsets from DWARF, in the worker."""
    written: dict[int, object] = {}
    exe = build_go("labels")  # with DWARF
    _fake_proc(tmp_path, 7, exe)
    reg = TraceContextRegistry(lambda pid, v: written.__setitem__(pid, v), proc_root=str(tmp_path))
    reg.observe(7, "go-labels")
    assert reg._worker is None  # nothing queued
    assert (written[7].g_m, written[7].m_curg, written[7].g_labels) == VERSION_TABLE[(1, 27)]
    reg.close()

    monkeypatch.delitem(VERSION_TABLE, (1, 27))  # a release newer than the table
    written.clear()
    reg = TraceContextRegistry(lambda pid, v: written.__setitem__(pid, v), proc_root=str(tmp_path))
    reg.observe(7, "go-labels")
    assert 7 not in written  # nothing to read until DWARF says where
    reg.close()  # waits for the DWARF read
    [ctx] = reg.layouts().values()
    assert ctx.go is not None and ctx.go.source == "dwarf" and not ctx.go_unknown
    with ElfFile(exe) as elf:
        assert written[7].g_m == ctx.go.g_m and (ctx.go.g_m, ctx.go.m_curg, ctx.go.g_labels) == dwarf_offsets(elf)
