"""The web UI's HTTP server: one page for every route, and the JSON API behind it.

    GET /                                   traces and spans list (the page)
    GET /trace/<trace_id>                   one trace (the page; deep link)
    GET /trace/<trace_id>/span/<span_id>    one span and its flame graph (the page; deep link)
    GET /api/spans?service=&name=&min_ms=&max_ms=&since_ms=&until_ms=&trace_id=&limit=&offset=
    GET /api/trace/<trace_id>
    GET /api/trace/<trace_id>/span/<span_id>/flamegraph?type=&from_ms=&to_ms=
    GET /api/trace/<trace_id>/span/<span_id>/diff?type=&baseline=name|range&from_ms=&to_ms=&base_from_ms=&base_to_ms=
    GET /api/trace/<trace_id>/span/<span_id>/pprof?type=&from_ms=&to_ms=   (gzip'd pprof download)
    GET /api/status
    GET /profile/<id>                       a profile loaded from a file (`bpfprof view`; the page)
    GET /api/profiles                       the profiles loaded from files
    GET /api/profile/<id>/flamegraph?type=&from_ms=&to_ms=
    GET /api/profile/<id>/diff?type=&base=<id>                     (against another loaded profile)
    GET /api/profile/<id>/pprof?type=&from_ms=&to_ms=

Times in the API are milliseconds (floats): Unix ms for absolute times,
offsets from the span's (or profile's) start for ranges, because JavaScript numbers cannot
hold Unix nanoseconds exactly.
"""

from __future__ import annotations

import http.server
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from exporters.pprof import encode_pprof
from viewer import file_profiles
from viewer.attribution import Attribution, Method, SpanSamples
from viewer.flamegraph import diff, dumps, flamegraph, timeline, to_profile
from viewer.store import LoadedProfile, SpanFilter, SpanRecord, Store

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
DIFF_BASELINE_SPANS = 50  # other spans of the same name summed into a baseline

_HEX_TRACE = r"(?P<trace>[0-9a-fA-F]{32})"
_HEX_SPAN = r"(?P<span>[0-9a-fA-F]{16})"
_PROFILE = r"(?P<profile>\d{1,18})"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


def span_json(s: SpanRecord) -> dict:
    return {"trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(), "parent_span_id": s.parent_span_id.hex(),
            "name": s.name, "service": s.service, "kind": s.kind, "start_unix_ms": s.start_ns / 1e6,
            "duration_ms": s.duration_ns / 1e6, "status_code": s.status_code, "status_message": s.status_message,
            "pid": s.pid, "tid": s.tid, "thread_attr": s.thread_attr, "thread_name": s.thread_name,
            "attributes": s.attributes, "resource": s.resource}


def _q(query: dict[str, list[str]], name: str, default: str = "") -> str:
    return query.get(name, [default])[0]


def _float(query: dict[str, list[str]], name: str) -> float | None:
    v = _q(query, name)
    if v == "":
        return None
    try:
        return float(v)
    except ValueError:
        raise ApiError(400, f"{name}={v!r} is not a number") from None


def _window(span: SpanRecord | LoadedProfile, query: dict[str, list[str]], lo: str, hi: str) -> tuple[int, int]:
    """[from, to] in Unix ns from offsets (ms) into the span (or loaded profile), clamped to it."""
    a, b = _float(query, lo), _float(query, hi)
    start = span.start_ns + int((a or 0) * 1e6)
    end = span.end_ns if b is None else span.start_ns + int(b * 1e6)
    start, end = max(span.start_ns, start), min(span.end_ns, end)
    if end < start:
        raise ApiError(400, f"{lo}..{hi} selects nothing of the {'span' if isinstance(span, SpanRecord) else 'profile'}")
    return start, end


def _pprof_reply(store: Store, a: Attribution, name: str) -> Reply:
    if not a.samples:
        raise ApiError(404, f"no samples: {a.reason}")
    return Reply(200, encode_pprof(to_profile(store, a)), "application/octet-stream",
                 (("Content-Disposition", f'attachment; filename="{name}"'),))


class Api:
    """Route table and handlers; pure functions of the store and the request."""

    def __init__(self, store: Store, page: Callable[[], bytes]) -> None:
        self.store, self.page = store, page
        self.routes: list[tuple[re.Pattern, Callable[..., Reply]]] = [
            (re.compile(r"^/$"), self._page),
            (re.compile(rf"^/trace/{_HEX_TRACE}/?$"), self._page),
            (re.compile(rf"^/trace/{_HEX_TRACE}/span/{_HEX_SPAN}/?$"), self._page),
            (re.compile(r"^/api/status$"), self.status),
            (re.compile(r"^/api/spans$"), self.spans),
            (re.compile(rf"^/api/trace/{_HEX_TRACE}$"), self.trace),
            (re.compile(rf"^/api/trace/{_HEX_TRACE}/span/{_HEX_SPAN}/flamegraph$"), self.flamegraph),
            (re.compile(rf"^/api/trace/{_HEX_TRACE}/span/{_HEX_SPAN}/diff$"), self.diff),
            (re.compile(rf"^/api/trace/{_HEX_TRACE}/span/{_HEX_SPAN}/pprof$"), self.pprof),
            (re.compile(rf"^/profile/{_PROFILE}/?$"), self._page),
            (re.compile(r"^/api/profiles$"), self.profiles),
            (re.compile(rf"^/api/profile/{_PROFILE}/flamegraph$"), self.profile_flamegraph),
            (re.compile(rf"^/api/profile/{_PROFILE}/diff$"), self.profile_diff),
            (re.compile(rf"^/api/profile/{_PROFILE}/pprof$"), self.profile_pprof),
        ]

    def handle(self, target: str) -> Reply:
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        for pattern, handler in self.routes:
            m = pattern.match(parts.path)
            if m:
                try:
                    return handler(query, **m.groupdict())
                except ApiError as e:
                    return self._json({"error": str(e)}, e.status)
        return self._json({"error": f"no such page: {parts.path}"}, 404)

    @staticmethod
    def _json(obj: object, status: int = 200) -> Reply:
        return Reply(status, dumps(obj).encode(), "application/json")

    def _page(self, query: dict, **_: str) -> Reply:
        return Reply(200, self.page(), "text/html; charset=utf-8")

    def _span(self, trace: str, span: str) -> SpanRecord:
        s = self.store.span(bytes.fromhex(trace), bytes.fromhex(span))
        if s is None:
            raise ApiError(404, f"no span {span} in trace {trace} (not received, or dropped by retention)")
        return s

    def status(self, query: dict) -> Reply:
        return self._json({"counts": self.store.counts(), "db_bytes": self.store.size_bytes()})

    def spans(self, query: dict) -> Reply:
        def ms(name: str) -> int:
            v = _float(query, name)
            return int(v * 1e6) if v else 0

        trace_id = _q(query, "trace_id").strip().lower()
        if trace_id and not re.fullmatch(r"[0-9a-f]{32}", trace_id):
            raise ApiError(400, "trace_id must be 32 hex digits")
        limit = int(_float(query, "limit") or 100)
        f = SpanFilter(service=_q(query, "service"), name=_q(query, "name"), min_duration_ns=ms("min_ms"),
                       max_duration_ns=ms("max_ms"), since_ns=ms("since_ms"), until_ns=ms("until_ms"),
                       trace_id=bytes.fromhex(trace_id), limit=max(1, min(MAX_LIMIT, limit)),
                       offset=max(0, int(_float(query, "offset") or 0)))
        return self._json({"spans": [span_json(s) for s in self.store.spans(f)], "services": self.store.services()})

    def trace(self, query: dict, trace: str) -> Reply:
        spans = self.store.trace(bytes.fromhex(trace))
        if not spans:
            raise ApiError(404, f"no trace {trace} (not received, or dropped by retention)")
        return self._json({"trace_id": trace.lower(), "spans": [span_json(s) for s in spans]})

    def flamegraph(self, query: dict, trace: str, span: str) -> Reply:
        s = self._span(trace, span)
        found = SpanSamples(self.store, s, _window(s, query, "from_ms", "to_ms"))
        a = found.for_type(_q(query, "type"))
        return self._json({
            "span": span_json(s), "method": a.method.value, "reason": a.reason,
            "type": a.profile_type.key if a.profile_type else "",
            "types": [{"key": t.key, "kind": t.kind, "sample_type": t.sample_type, "unit": t.unit}
                      for t in found.types()],
            "window_ms": [(a.window[0] - s.start_ns) / 1e6, (a.window[1] - s.start_ns) / 1e6],
            "flamegraph": flamegraph(self.store, a), "timeline": timeline(a), "samples": len(a.samples),
        })

    def diff(self, query: dict, trace: str, span: str) -> Reply:
        s = self._span(trace, span)
        type_key = _q(query, "type")
        target = SpanSamples(self.store, s, _window(s, query, "from_ms", "to_ms")).for_type(type_key)
        type_key = target.profile_type.key if target.profile_type else type_key
        mode = _q(query, "baseline", "name")
        if mode == "name":
            others = [o for o in self.store.spans_named(s.service, s.name, DIFF_BASELINE_SPANS + 1)
                      if (o.trace_id, o.span_id) != (s.trace_id, s.span_id)][:DIFF_BASELINE_SPANS]
            baselines = [SpanSamples(self.store, o).for_type(type_key) for o in others]
            what = f"{len(others)} other spans named {s.name!r} of {s.service!r}"
        elif mode == "range":
            baselines = [SpanSamples(self.store, s, _window(s, query, "base_from_ms", "base_to_ms")).for_type(type_key)]
            what = "the baseline time range of this span"
        else:
            raise ApiError(400, f"baseline={mode!r}: use name or range")
        baselines = [b for b in baselines if b.method != Method.NONE]
        return self._json({"span": span_json(s), "method": target.method.value, "reason": target.reason,
                           "type": type_key, "baseline": what, "baseline_methods": sorted({b.method.value for b in baselines}),
                           "flamegraph": diff(self.store, target, baselines)})

    def pprof(self, query: dict, trace: str, span: str) -> Reply:
        s = self._span(trace, span)
        a = SpanSamples(self.store, s, _window(s, query, "from_ms", "to_ms")).for_type(_q(query, "type"))
        kind = a.profile_type.kind if a.profile_type else "profile"
        return _pprof_reply(self.store, a, f"bpfprof-{trace[:8]}-{span}-{kind}.pb.gz")

    # --- profiles loaded from files (`bpfprof view`) --------------------------------------------

    def _loaded(self, profile: str) -> LoadedProfile:
        found = {lp.id: lp for lp in self.store.loaded_profiles()}
        lp = found.get(int(profile))
        if lp is None:
            raise ApiError(404, f"no profile {profile} (loaded: {', '.join(map(str, found)) or 'none'})")
        return lp

    def profiles(self, query: dict) -> Reply:
        return self._json({"profiles": [file_profiles.profile_json(lp) for lp in self.store.loaded_profiles()]})

    def profile_flamegraph(self, query: dict, profile: str) -> Reply:
        lp = self._loaded(profile)
        a = file_profiles.samples_of(self.store, lp, _q(query, "type"), _window(lp, query, "from_ms", "to_ms"))
        return self._json({
            "profile": file_profiles.profile_json(lp), "method": a.method.value, "reason": a.reason,
            "type": a.profile_type.key, "window_ms": [(a.window[0] - lp.start_ns) / 1e6, (a.window[1] - lp.start_ns) / 1e6],
            "flamegraph": flamegraph(self.store, a), "timeline": timeline(a), "samples": len(a.samples),
        })

    def profile_diff(self, query: dict, profile: str) -> Reply:
        lp = self._loaded(profile)
        base_id = _q(query, "base")
        if not base_id.isdigit():
            raise ApiError(400, "base= names the loaded profile to compare with (its id)")
        base = self._loaded(base_id)
        target = file_profiles.samples_of(self.store, lp, _q(query, "type"))
        type_key = target.profile_type.key
        baseline = file_profiles.samples_of(self.store, base, type_key)
        if baseline.profile_type.key != type_key:
            raise ApiError(400, f"{base.source} has no {type_key} samples: compare profiles of the same type")
        return self._json({"profile": file_profiles.profile_json(lp), "method": target.method.value,
                           "reason": target.reason, "type": type_key, "baseline": base.source,
                           "flamegraph": diff(self.store, target, [baseline])})

    def profile_pprof(self, query: dict, profile: str) -> Reply:
        lp = self._loaded(profile)
        a = file_profiles.samples_of(self.store, lp, _q(query, "type"), _window(lp, query, "from_ms", "to_ms"))
        stem = re.sub(r"[^\w.-]+", "_", lp.source.rsplit("/", 1)[-1]).removesuffix(".pb.gz")
        return _pprof_reply(self.store, a, f"{stem}-{a.profile_type.kind or 'profile'}.pb.gz")


def make_handler(api: Api) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "bpfprof-serve"

        def do_GET(self) -> None:  # noqa: N802  (BaseHTTPRequestHandler's name)
            try:
                reply = api.handle(self.path)
            except Exception as e:  # the UI server never dies of one request
                log.exception("UI request %s failed", self.path)
                reply = Reply(500, dumps({"error": f"internal error: {e}"}).encode(), "application/json")
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in reply.headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("ui: " + fmt, *args)

    return Handler
