"""The debuginfod client against a real http.server on 127.0.0.1 serving a debug file objcopy made:
found, 404 remembered, a slow server given up at the deadline, garbage and a wrong build id refused, the
cache's byte budget."""

from __future__ import annotations

import http.server
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from symbolizer.debuginfod import DebuginfodClient, urls_from
from symbolizer.elf import ElfFile
from symbolizer.file_symbols import SymbolCache
from tests.unit.test_debug_files import _build_id, _nm, _run

SOURCE = """
static int __attribute__((noinline)) hidden_work(int x) { int s = 0; for (int i = 0; i < x; i++) s += i * x; return s; }
int exported(int x) { return hidden_work(x) + 1; }
"""


class Server:
    """A debuginfod server: `files` by build id, `delay_s` before answering, `body` to serve instead."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.delay_s = 0.0
        self.body: bytes | None = None
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.requests.append(self.path)
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                parts = self.path.split("/")  # "", buildid, HEX, debuginfo
                data = outer.body if outer.body is not None else outer.files.get(parts[2] if len(parts) > 2 else "")
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _lib(tmp_path: Path, name: str, extra: str = "") -> tuple[Path, Path, str]:
    """(stripped library, its --only-keep-debug file, build id)."""
    src = tmp_path / f"{name}.c"
    src.write_text(SOURCE + extra)
    full, debug, stripped = tmp_path / f"{name}.so", tmp_path / f"{name}.debug", tmp_path / f"{name}-s.so"
    _run("gcc", "-g", "-O1", "-shared", "-fPIC", "-Wl,--build-id", "-o", str(full), str(src))
    _run("objcopy", "--only-keep-debug", str(full), str(debug))
    _run("objcopy", "--strip-all", str(full), str(stripped))
    return stripped, debug, _build_id(full)


@pytest.fixture
def lib(tmp_path: Path) -> tuple[Path, Path, str, int]:
    stripped, debug, bid = _lib(tmp_path, "libx")
    return stripped, debug, bid, _nm(debug, "hidden_work")


def _client(tmp_path: Path, url: str, **kw) -> DebuginfodClient:
    return DebuginfodClient([url], cache_dir=tmp_path / "cache" / "debuginfod", **kw)


def test_found_names_resolved_and_cached(server, lib, tmp_path):
    stripped, debug, bid, addr = lib
    server.files[bid] = debug.read_bytes()
    client = _client(tmp_path, server.url)
    cache = SymbolCache(debug_dirs=(), debuginfod=client)
    frames = cache.get(ElfFile(stripped)).symbolize(addr)
    assert frames and frames[-1].function == "hidden_work"
    assert client.outcomes["found"] == 1
    # on disk: root-only directory, a 0600 file of that build id, read back without asking again
    assert stat.S_IMODE(os.stat(client.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(client.path_of(bid)).st_mode) == 0o600
    assert client.path_of(bid).read_bytes() == debug.read_bytes()
    asked = len(server.requests)
    again = _client(tmp_path, server.url).find(bid)
    assert again is not None and again.gnu_build_id == bid
    assert len(server.requests) == asked
    assert not [p for p in os.listdir(client.directory) if p.startswith(".tmp-")]


def test_not_found_is_remembered(server, lib, tmp_path):
    _, _, bid, _ = lib
    client = _client(tmp_path, server.url)
    assert client.find(bid) is None
    assert client.find(bid) is None
    assert len(server.requests) == 1
    assert client.outcomes["not_found"] == 1 and client.outcomes["negative_cached"] == 1


def test_slow_server_given_up_at_the_deadline(server, lib, tmp_path):
    _, debug, bid, _ = lib
    server.files[bid] = debug.read_bytes()
    server.delay_s = 5.0
    client = _client(tmp_path, server.url, deadline_s=0.3)
    start = time.monotonic()
    assert client.find(bid) is None
    assert time.monotonic() - start < server.delay_s  # returned before the server's sleep ended
    assert client.outcomes["timeout"] == 1
    # the server is skipped for a while, not asked again at each lookup
    assert client.find("00" * 20) is None
    assert client.outcomes["server_backoff"] == 1 and len(server.requests) == 1


def test_down_server_counted(lib, tmp_path):
    _, _, bid, _ = lib
    closed = Server()
    url = closed.url
    closed.close()  # nothing listens on its port now
    client = _client(tmp_path, url)
    assert client.find(bid) is None
    assert client.outcomes["error"] == 1


def test_garbage_and_wrong_build_id_refused(server, lib, tmp_path):
    _, _, bid, _ = lib
    server.body = b"<html>not an ELF file</html>"
    client = _client(tmp_path, server.url)
    assert client.find(bid) is None
    other = shutil.which("true") or "/bin/true"
    server.body = Path(other).read_bytes()  # an ELF file of another build id
    client = _client(tmp_path, server.url)
    assert client.find(bid) is None
    assert client.outcomes["invalid"] == 1
    assert not os.listdir(client.directory)  # nothing kept, no temporary left behind


def test_cache_budget_evicts(server, tmp_path):
    a_stripped, a_debug, a_bid = _lib(tmp_path, "liba")
    b_stripped, b_debug, b_bid = _lib(tmp_path, "libb", "int more(int x) { return x * 3; }\n")
    server.files[a_bid] = a_debug.read_bytes()
    server.files[b_bid] = b_debug.read_bytes()
    budget = max(a_debug.stat().st_size, b_debug.stat().st_size) + 16  # room for one of them
    client = _client(tmp_path, server.url, cache_bytes=budget)
    assert client.find(a_bid) is not None
    assert client.path_of(a_bid).exists()
    assert client.find(b_bid) is not None
    assert client.path_of(b_bid).exists() and not client.path_of(a_bid).exists()


def test_urls_from_config_then_environment():
    assert urls_from(["http://a"], {"DEBUGINFOD_URLS": "http://b"}) == ("http://a",)
    assert urls_from([], {"DEBUGINFOD_URLS": " http://b  https://c "}) == ("http://b", "https://c")
    assert urls_from([], {}) == ()
