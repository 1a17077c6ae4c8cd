"""bench (not a test): `bpfprof agent` for a long run of process churn while its collector misbehaves.

    .venv/bin/python bench/agent_soak.py                                # 30 min, the collector flaps every 2 min
    flock /tmp/work/heavy.lock .venv/bin/python bench/agent_soak.py --minutes 6 --flap-s 60

Starts `--rate` short-lived processes a minute (bench/agent_churn.py's
churn program) and `bpfprof agent` profiling the whole machine at 99 Hz,
exporting every `--interval` s to an OTLP/HTTP collector run here and to a
pprof directory. Every `--flap-s` seconds the collector changes state, in
this cycle: up, down (port closed), throttling (429 with Retry-After), up,
dripping (headers then a byte a second), hanging (never answers).

At the end (SIGTERM) it prints the agent's CPU seconds, its RSS curve, and
its books from the exit log: samples accepted (produced), then per exporter
delivered, dropped by reason, left queued, and whether produced = exported +
dropped + queued (+ what was lost before export). The collector's own count
of the samples it took is a second witness of the OTLP exporter's. It also
checks each interval's "gone before their maps were read" comment against
the profile's own sample count (a running total would outgrow it). Figures,
never pass/fail on time: a book that does not balance prints MISS, and the
exit status stays 0.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gzip
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from agent_churn import Churn, build_churn, metrics, rss_mb  # noqa: E402
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (  # noqa: E402
    ExportProfilesServiceRequest,
)

from exporters.otlp import decode_otlp  # noqa: E402
from recording import BPFPROF, read_pprof  # noqa: E402

# Two failures in a row, twice a cycle: past queue_max_batches x interval_s the queue must drop (and count).
CYCLE = ("up", "down", "throttle", "up", "drip", "hang")
GONE = "user stacks of processes gone before their maps were read"


class FlappingCollector:
    """An OTLP/HTTP collector on a fixed loopback port whose behaviour changes every `flap_s` seconds."""

    def __init__(self, port: int, flap_s: float, retry_after_s: int) -> None:
        self.port, self.flap_s, self.retry_after_s = port, flap_s, retry_after_s
        self.mode = "up"
        self.received_samples = 0
        self.requests: dict[str, int] = {m: 0 for m in CYCLE}
        self.modes_seen: list[str] = []
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._listen()
        threading.Thread(target=self._flap, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._close_listener()

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _close_listener(self) -> None:
        if self._listener is not None:
            # shutdown() first: close() alone leaves the accept() blocked in the other thread holding the
            # socket, still listening, and the next "up" cannot bind the port (the collector died there).
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None

    def _flap(self) -> None:
        i = 0
        self.modes_seen.append(self.mode)
        while not self._stop.wait(self.flap_s):
            i += 1
            mode = CYCLE[i % len(CYCLE)]
            if mode == "down":
                self._close_listener()
            elif self.mode == "down":
                self._listen()
            self.mode = mode
            self.modes_seen.append(mode)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        try:
            head, body = self._read(conn)
            mode = self.mode
            with self._lock:
                self.requests[mode] = self.requests.get(mode, 0) + 1
            if mode == "up":
                if b"content-encoding: gzip" in head.lower():
                    body = gzip.decompress(body)
                req = ExportProfilesServiceRequest()
                req.ParseFromString(body)
                n = sum(len(s.timestamps_ns) or 1 for p in decode_otlp(req) for s in p.samples)
                with self._lock:
                    self.received_samples += n
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n")
            elif mode == "throttle":
                conn.sendall(f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: {self.retry_after_s}\r\n"
                             f"Content-Length: 0\r\n\r\n".encode())
            elif mode == "drip":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3600\r\n\r\n")
                while not self._stop.wait(1.0) and self.mode == "drip":
                    conn.sendall(b"\0")
            else:  # hang (or went down mid-request): say nothing until the client gives up
                while not self._stop.is_set() and self.mode in ("hang", "down"):
                    if conn.recv(1) == b"":
                        break
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _read(conn: socket.socket) -> tuple[bytes, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionResetError
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        m = re.search(rb"content-length:\s*(\d+)", head, re.I)
        length = int(m.group(1)) if m else 0
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionResetError
            body += chunk
        return head, body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_books(log: str) -> tuple[int, int, dict[str, int], dict[str, tuple[int, dict[str, int], int]]]:
    """(accepted, relabel-dropped, lost before export, exporter -> (delivered, dropped by reason, queued))."""
    m = re.search(r"books: (\d+) samples accepted; before export (\d+) relabel-dropped, lost (none|\{.*\})", log)
    if m is None:
        sys.exit("the agent's exit log has no books line: did it exit cleanly?\n" + log[-3000:])
    lost = {} if m.group(3) == "none" else ast.literal_eval(m.group(3))
    out = {}
    for name, delivered, dropped, queued in re.findall(
            r"books: export (\S+): (\d+) samples delivered, dropped (none|\{.*\}), (\d+) queued", log):
        out[name] = (int(delivered), {} if dropped == "none" else ast.literal_eval(dropped), int(queued))
    return int(m.group(1)), int(m.group(2)), lost, out


def gone_comments(pprof_dir: Path) -> tuple[int, int, int]:
    """(profiles, the largest 'gone' count of one interval, profiles whose 'gone' count exceeds their samples)."""
    profiles = largest = over = 0
    for f in sorted(pprof_dir.glob("*.cpu.pb.gz")):
        d = read_pprof(f)
        p = d.raw
        profiles += 1
        samples = d.total()
        for c in p.comment:
            text = p.string_table[c]
            if text.endswith(GONE):
                n = int(text.split()[1])
                largest = max(largest, n)
                over += n > samples
    return profiles, largest, over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--flap-s", type=float, default=120, help="seconds between collector state changes")
    ap.add_argument("--rate", type=float, default=1000, help="short-lived processes started per minute")
    ap.add_argument("--life-ms", type=int, default=250)
    ap.add_argument("--interval", type=float, default=10, help="the agent's export.interval_s")
    ap.add_argument("--timeout", type=float, default=5, help="the agent's export.timeout_s")
    ap.add_argument("--retry-after", type=int, default=20, help="the throttling collector's Retry-After, seconds")
    ap.add_argument("--max-processes", type=int, default=1024)
    ap.add_argument("--symbol-cache-mib", type=int, default=None,
                    help="the agent's limits.max_symbol_cache_bytes in MiB (default: the agent's default)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bpfprof-soak-") as tmp:
        work = Path(tmp)
        exe = build_churn(work)
        port, mport = free_port(), free_port()
        collector = FlappingCollector(port, args.flap_s, args.retry_after)
        config = work / "agent.yaml"
        config.write_text(
            f"log_level: info\nmetrics:\n  listen: 127.0.0.1:{mport}\n"
            f"limits:\n  max_processes: {args.max_processes}\n"
            + (f"  max_symbol_cache_bytes: {args.symbol_cache_mib << 20}\n" if args.symbol_cache_mib else "")
            + f"export:\n  interval_s: {args.interval}\n  timeout_s: {args.timeout}\n"
            f"  otlp:\n    endpoint: http://127.0.0.1:{port}\n"
            f"  pprof_dir:\n    path: {work / 'pprof'}\n    max_files: 100000\n")
        log_path = work / "agent.log"
        collector.start()
        agent = subprocess.Popen([str(BPFPROF), "agent", "--config", str(config)],
                                 stderr=open(log_path, "w"))  # noqa: SIM115
        while metrics(mport).get("bpfprof_ready") != 1.0:
            if agent.poll() is not None:
                sys.exit(f"agent exited: {log_path.read_text()}")
            time.sleep(0.2)
        curve, t0 = [], time.monotonic()
        with Churn(exe, args.rate, args.life_ms) as churn:
            while time.monotonic() - t0 < args.minutes * 60:
                curve.append((round(time.monotonic() - t0), round(rss_mb(agent.pid), 1)))
                time.sleep(min(30.0, max(1.0, args.minutes * 60 / 60)))
        last = metrics(mport)
        stop_t = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(agent.pid, 0)
        stop_s = time.monotonic() - stop_t
        collector.stop()
        log = log_path.read_text()
        code = os.waitstatus_to_exitcode(status)
        accepted, relabeled, lost, exporters = parse_books(log)
        profiles, largest_gone, over = gone_comments(work / "pprof")

        print(f"soak: {args.minutes:g} min, {churn.started} processes started, collector states "
              f"{' '.join(collector.modes_seen)} (every {args.flap_s:g}s); agent exit {code} "
              f"{stop_s:.1f}s after SIGTERM")
        print(f"agent CPU {usage.ru_utime + usage.ru_stime:.1f}s "
              f"({100 * (usage.ru_utime + usage.ru_stime) / (args.minutes * 60):.1f}% of one CPU), "
              f"peak RSS {usage.ru_maxrss / 1024:.0f} MB")
        print("RSS curve (s:MB): " + " ".join(f"{t}:{mb}" for t, mb in curve))
        second_half = sorted(mb for t, mb in curve if t >= args.minutes * 30)
        if second_half:
            print(f"RSS over the second half: median {second_half[len(second_half) // 2]} MB, "
                  f"max {second_half[-1]} MB")
        print(f"symbol cache (last scrape): {last.get('bpfprof_symbolizer_cache_files', 0):g} files, "
              f"{last.get('bpfprof_symbolizer_cache_bytes', 0) / 2**20:.0f} MiB held, "
              f"{last.get('bpfprof_symbolizer_cache_budget_evictions_total', 0):g} released by its byte budget; "
              f"{last.get('bpfprof_processes_tracked', 0):g} processes tracked, "
              f"{last.get('bpfprof_process_evictions_total', 0):g} evicted")
        lost_bpf = {k.split('"')[1]: v for k, v in last.items() if k.startswith("bpfprof_lost_samples_total{")}
        print(f"bpfprof_lost_samples by reason (BPF drops, caps, cut stacks; last scrape): {lost_bpf or 'none'}")
        timeouts = last.get('bpfprof_export_timeouts_total{exporter="otlp"}', 0)
        print(f"export attempts timed out (last scrape): {timeouts:g}; collector requests by state: "
              f"{collector.requests}")
        print(f"produced (accepted) {accepted}; lost before export {lost or 'none'}, relabel-dropped {relabeled}")
        before = relabeled + sum(lost.values())
        for name, (delivered, dropped, queued) in exporters.items():
            total = delivered + sum(dropped.values()) + queued + before
            ok = total == accepted
            print(f"  {name}: exported {delivered}, dropped {dropped or 'none'}, queued {queued}: "
                  f"{total} of {accepted} {'balance: PASS' if ok else 'do not balance: MISS'}")
        if "otlp" in exporters:
            ok = collector.received_samples == exporters["otlp"][0]
            print(f"  collector took {collector.received_samples} samples, the agent says it exported "
                  f"{exporters['otlp'][0]}: {'PASS' if ok else 'MISS'}")
        levels = re.findall(r"\blevel=(\w+)", log)
        released = re.findall(r"symbol cache: (\d+) files released", log)
        print(f"agent log: {levels.count('warning')} warnings, {levels.count('error')} errors, "
              f"{log.count('Traceback')} tracebacks; symbol cache releases logged: {len(released)} "
              f"({sum(map(int, released))} files)")
        print(f"'gone before their maps were read': {profiles} profiles, at most {largest_gone} in one interval, "
              f"{over} interval(s) claiming more than their own samples: {'PASS' if not over else 'MISS'}")


if __name__ == "__main__":
    main()
