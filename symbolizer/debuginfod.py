"""A debuginfod client: separate debug files fetched by build id from servers the operator names.

Off unless DEBUGINFOD_URLS or profiling.debuginfod_urls names servers. The
lookup runs when a file's debug info is first needed (the symbolizer's build
at interval end, never the sampling path), and waits at most `deadline_s` for
the whole lookup: the request runs on a thread of its own that the caller
stops waiting for at the deadline (so even a DNS lookup that hangs cannot
stall it), and that thread enforces the same deadline and a size cap on every
read. A server that timed out or failed is skipped for `backoff_s`; a build id
no server has is remembered for `negative_ttl_s`, so it is not asked again each
interval. Every outcome is counted (`outcomes`, exported as
bpfprof_debuginfod_requests_total{outcome}) and logged once per server.

A downloaded file is used only when it is an ELF file whose GNU build id is
the one asked for. Files live in a root-only (0700) directory, 0600 each,
written atomically (temporary file, then rename), least recently used evicted
past a byte budget; they are read with ElfFile (bounded preadv, never mmap).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from symbolizer.elf import ElfFile
from symbolizer.errors import ElfParseError
from symbolizer.unwind_cache import cache_dir, private_dir

if TYPE_CHECKING:
    import http.client

log = logging.getLogger(__name__)

ENV_URLS = "DEBUGINFOD_URLS"
DEFAULT_DEADLINE_S = 5.0
DEFAULT_CACHE_BYTES = 1 << 30
MAX_FILE_BYTES = 512 << 20  # a debug file larger than this is not downloaded
NEGATIVE_TTL_S = 3600.0
BACKOFF_S = 60.0
MAX_NEGATIVE = 65536  # build ids remembered as missing
MAX_REDIRECTS = 3
_CHUNK = 1 << 16
_BUILD_ID = re.compile(r"[0-9a-f]{8,128}")
OUTCOMES = ("found", "cache_hit", "not_found", "negative_cached", "timeout", "error", "invalid", "too_large",
            "server_backoff")


def urls_from(configured: Sequence[str], env: dict[str, str] | None = None) -> tuple[str, ...]:
    """The servers to ask: the configured ones, else DEBUGINFOD_URLS (space-separated), else none."""
    if configured:
        return tuple(configured)
    value = (os.environ if env is None else env).get(ENV_URLS, "")
    return tuple(u for u in value.split() if u)


def check_url(url: str) -> bool:
    """Whether `url` is an http(s) URL with a host (what the client can ask)."""
    try:
        p = urllib.parse.urlsplit(url)
        _ = p.port  # ValueError if not a number in range
    except ValueError:
        return False
    return p.scheme in ("http", "https") and bool(p.hostname)


def default_cache_dir() -> Path:
    """debuginfod/ beside the other caches (symbolizer/unwind_cache.cache_dir's root)."""
    return cache_dir().parent / "debuginfod"


class _Fetch:
    """One request on its own thread; the caller may stop waiting (abandon) and the thread cleans up."""

    def __init__(self, url: str, directory: Path, deadline: float, max_bytes: int) -> None:
        self.url, self.directory, self.deadline, self.max_bytes = url, directory, deadline, max_bytes
        self.outcome = "timeout"
        self.detail = ""
        self.tmp: str | None = None
        self.lock = threading.Lock()
        self.abandoned = False
        self.done = False  # set under `lock` as the thread's last act: the caller trusts this, not is_alive()
        self.thread = threading.Thread(target=self._run, name="debuginfod", daemon=True)

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def _run(self) -> None:
        import http.client  # noqa: PLC0415  (not at import: most captures ask no server, and it costs 20 ms)

        try:
            self.outcome = self._get(self.url)
        except (TimeoutError, OSError, http.client.HTTPException, ValueError) as e:
            self.outcome = "timeout" if isinstance(e, TimeoutError) else "error"
            self.detail = f"{type(e).__name__}: {e}"
        with self.lock:
            if (self.abandoned or self.outcome != "found") and self.tmp is not None:
                _unlink(self.tmp)
                self.tmp = None
            self.done = True

    def _get(self, url: str) -> str:
        import http.client  # noqa: PLC0415  (see _run)
        import ssl  # noqa: PLC0415

        for _ in range(MAX_REDIRECTS + 1):
            p = urllib.parse.urlsplit(url)
            if p.scheme == "https":
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    p.hostname or "", p.port, timeout=self._remaining(), context=ssl.create_default_context())
            elif p.scheme == "http":
                conn = http.client.HTTPConnection(p.hostname or "", p.port, timeout=self._remaining())
            else:
                raise ValueError(f"unsupported scheme {p.scheme!r}")
            try:
                path = (p.path or "/") + (f"?{p.query}" if p.query else "")
                conn.request("GET", path, headers={"User-Agent": "bpfprof", "Accept-Encoding": "identity"})
                resp = conn.getresponse()
                if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                    url = urllib.parse.urljoin(url, resp.getheader("Location", ""))
                    continue
                if resp.status == 404:
                    return "not_found"
                if resp.status != 200:
                    self.detail = f"HTTP {resp.status}"
                    return "error"
                length = resp.getheader("Content-Length")
                if length is not None and length.isdigit() and int(length) > self.max_bytes:
                    self.detail = f"{length} bytes"
                    return "too_large"
                return self._save(conn, resp)
            finally:
                conn.close()
        self.detail = "too many redirects"
        return "error"

    def _save(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> str:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)  # 0600
        with self.lock:
            self.tmp = tmp
        with os.fdopen(fd, "wb") as out:
            size = 0
            while True:
                if conn.sock is not None:
                    conn.sock.settimeout(self._remaining())
                chunk = resp.read1(_CHUNK)
                self._remaining()
                if not chunk:
                    return "found"
                size += len(chunk)
                if size > self.max_bytes:
                    self.detail = f"more than {self.max_bytes} bytes"
                    return "too_large"
                out.write(chunk)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class DebuginfodClient:
    """Debug files by GNU build id from debuginfod servers, cached on disk; never waits past `deadline_s`."""

    def __init__(self, urls: Sequence[str], cache_dir: Path | None = None, deadline_s: float = DEFAULT_DEADLINE_S,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, max_file_bytes: int = MAX_FILE_BYTES,
                 negative_ttl_s: float = NEGATIVE_TTL_S, backoff_s: float = BACKOFF_S) -> None:
        self.urls = tuple(u.rstrip("/") for u in urls)
        self.directory = cache_dir or default_cache_dir()
        self.deadline_s = deadline_s
        self.cache_bytes = cache_bytes
        self.max_file_bytes = min(max_file_bytes, cache_bytes)
        self.negative_ttl_s = negative_ttl_s
        self.backoff_s = backoff_s
        self.outcomes: Counter[str] = Counter()
        self._negative: dict[str, float] = {}  # build id -> monotonic time until which it is not asked again
        self._backoff: dict[str, float] = {}  # server -> monotonic time until which it is skipped
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()  # one lookup at a time: the symbolizer's callers may be threads
        self.usable = private_dir(self.directory) is None
        if self.usable:
            self._remove_stale_temporaries()
        if not self.usable:
            log.warning("debuginfod: cache directory %s is not a private directory of this user; "
                        "debuginfod lookups are off", self.directory)

    def _remove_stale_temporaries(self) -> None:
        """Downloads a killed agent left half-written (an hour old: a running one's are seconds old)."""
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    if e.name.startswith(".tmp-") and e.stat(follow_symlinks=False).st_mtime < time.time() - 3600:
                        _unlink(e.path)
        except OSError:
            pass

    def _count(self, outcome: str, server: str = "", detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if server and (server, outcome) not in self._logged and outcome not in ("found", "not_found"):
            self._logged.add((server, outcome))
            log.warning("debuginfod: %s: %s%s (logged once)", server, outcome, f" ({detail})" if detail else "")

    def path_of(self, build_id: str) -> Path:
        """Where the cached debug file of `build_id` is kept."""
        return self.directory / f"{build_id}.debug"

    def find(self, build_id: str) -> ElfFile | None:
        """The debug file of `build_id` (lowercase hex GNU build id), from the cache or a server, or None."""
        if not self.urls or not self.usable or not _BUILD_ID.fullmatch(build_id):
            return None
        with self._lock:
            return self._find(build_id)

    def _find(self, build_id: str) -> ElfFile | None:
        path = self.path_of(build_id)
        cached = self._validated(str(path), build_id)
        if cached is not None:
            self._count("cache_hit")
            try:
                os.utime(path)  # least recently used goes first
            except OSError:
                pass
            return cached
        now = time.monotonic()
        if self._negative.get(build_id, 0.0) > now:
            self._count("negative_cached")
            return None
        deadline = now + self.deadline_s
        definitive = True  # every server answered: not found or a file that is not it
        for server in self.urls:
            if self._backoff.get(server, 0.0) > time.monotonic():
                self._count("server_backoff")
                definitive = False
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                definitive = False
                break
            f = _Fetch(f"{server}/buildid/{build_id}/debuginfo", self.directory, deadline, self.max_file_bytes)
            f.thread.start()
            f.thread.join(left)
            with f.lock:
                if not f.done:
                    f.abandoned = True
                    outcome, tmp = "timeout", None
                else:
                    outcome, tmp = f.outcome, f.tmp
            if outcome == "found" and tmp is not None:
                found = self._validated(tmp, build_id)
                if found is None:
                    _unlink(tmp)
                    self._count("invalid", server, "not an ELF file of this build id")
                    continue
                found.close()
                os.replace(tmp, path)
                self._count("found", server)
                self._evict(keep=path)
                return self._validated(str(path), build_id)
            self._count(outcome, server, f.detail)
            if outcome in ("timeout", "error"):
                self._backoff[server] = time.monotonic() + self.backoff_s
                definitive = False
        ttl = self.negative_ttl_s if definitive else min(self.backoff_s, self.negative_ttl_s)
        if len(self._negative) >= MAX_NEGATIVE:
            now = time.monotonic()
            self._negative = {b: t for b, t in self._negative.items() if t > now}
            if len(self._negative) >= MAX_NEGATIVE:
                self._negative.clear()
        self._negative[build_id] = time.monotonic() + ttl
        return None

    @staticmethod
    def _validated(path: str, build_id: str) -> ElfFile | None:
        try:
            elf = ElfFile(path)
        except (ElfParseError, OSError):
            return None
        try:
            if elf.gnu_build_id == build_id:
                return elf
        except ElfParseError:
            pass
        elf.close()
        return None

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used files until the cache fits its byte budget (`keep` last)."""
        entries = []
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    if e.name.endswith(".debug") and e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        entries.append((e.path == str(keep), st.st_mtime, st.st_size, e.path))
        except OSError:
            return
        total = sum(size for _, _, size, _ in entries)
        for _, _, size, p in sorted(entries):
            if total <= self.cache_bytes:
                break
            _unlink(p)
            total -= size
