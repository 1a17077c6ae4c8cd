"""Load the cached BPF programs of a start before the rest of the agent is imported.

A warm start spends ~0.3 s importing the agent's modules and ~0.1 s in the
kernel's verifier, one after the other: the probe plan (and so the cache
key) is known only once the probe families are imported. The verifier runs
in bpf() calls that release the GIL, so the two can overlap, if the entry
to load is known before the imports.

It is known from the last start with the same options: after a load,
remember() writes a small hint, named by the command line with its
per-run values (duration, output, pids, the command) left out, holding the
cache key and map sizes that start loaded. The next start with those
options calls start() first thing; a thread loads that entry while the
imports go on; the real load then take()s the objects if the key it computed
and the map sizes are the same, else closes them and loads as before. A
wrong or stale hint costs one extra verification, never a wrong program.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from agent.bpfload import bpf_cache
from symbolizer.unwind_cache import read_private

log = logging.getLogger(__name__)

HINT_SUFFIX = ".start"
MAX_HINT_BYTES = 4096
MAX_HINTS = 64  # distinct option sets remembered; the oldest go first
# Options whose value changes from run to run without changing what is loaded.
PER_RUN_VALUES = frozenset({"--duration", "-o", "--output", "--pid"})
LOADS_NOTHING = frozenset({"-h", "--help", "--check-config"})  # options with which the command loads no BPF


def hint_name(command: str, args: Sequence[str]) -> str:
    """The hint's name: `command` and its options, per-run values and any profiled command left out."""
    kept = [command]
    skip_value = False
    for a in args:
        if skip_value:
            skip_value = False
            kept.append("*")
            continue
        if a == "--":
            kept.append("-- *")
            break
        opt, eq, _ = a.partition("=")
        if opt in PER_RUN_VALUES:
            kept.append(opt)
            if eq:
                kept.append("*")
            skip_value = not eq
            continue
        kept.append(a)
    return hashlib.sha256("\0".join(kept).encode()).hexdigest()[:32]


class _Preload:
    def __init__(self, key: str, map_entries: dict[str, int]) -> None:
        self.key, self.map_entries = key, map_entries
        self.objects: tuple[dict[str, int], dict[str, int]] | None = None
        self.thread = threading.Thread(target=self._run, name="bpf-preload", daemon=True)

    def _run(self) -> None:
        try:
            entry = bpf_cache.read(self.key)
            if entry is not None:
                self.objects = bpf_cache.load(entry, self.map_entries)
        except Exception as e:  # noqa: BLE001  (the real load runs anyway and reports its own errors)
            log.debug("BPF preload of %s failed: %s", self.key[:16], e)

    def close(self) -> None:
        if self.objects is not None:
            for fd in (*self.objects[0].values(), *self.objects[1].values()):
                os.close(fd)
            self.objects = None


_lock = threading.Lock()
_pending: _Preload | None = None
_name: str | None = None  # the hint the first load of this process writes


def _hint_path(name: str) -> Path:
    return bpf_cache.cache_dir() / f"{name}{HINT_SUFFIX}"


def _read_hint(path: Path) -> tuple[str, dict[str, int]] | None:
    """(key, map sizes) of a private hint file, None if absent or not one (bounded, no symlinks)."""
    try:
        data = json.loads(read_private(path, MAX_HINT_BYTES))
        key, sizes = data["key"], data["map_entries"]
        if not (isinstance(key, str) and len(key) == 64 and all(c in "0123456789abcdef" for c in key)):
            return None
        if not (isinstance(sizes, dict) and all(isinstance(k, str) and type(v) is int and 0 < v < 1 << 32
                                                for k, v in sizes.items())):
            return None
        return key, sizes
    except (OSError, ValueError, KeyError, TypeError):  # NotPrivate and JSON's errors are ValueErrors
        return None


def start(command: str, args: Sequence[str]) -> None:
    """Begin loading what the last start with these options loaded, in a thread (root only; once)."""
    global _pending, _name
    if os.geteuid() != 0 or LOADS_NOTHING.intersection(args):
        return
    with _lock:
        if _name is not None:
            return
        _name = hint_name(command, args)
        hint = _read_hint(_hint_path(_name))
        if hint is None:
            return
        _pending = _Preload(*hint)
        _pending.thread.start()


def take(key: str, map_entries: dict[str, int] | None) -> tuple[dict[str, int], dict[str, int]] | None:
    """The preloaded (program fds, named map fds) if they are of `key` at these sizes, else None."""
    global _pending
    with _lock:
        p, _pending = _pending, None
    if p is None:
        return None
    p.thread.join()
    if p.objects is not None and p.key == key and p.map_entries == (map_entries or {}):
        objects, p.objects = p.objects, None
        return objects
    if p.objects is not None:
        log.info("BPF programs loaded ahead from a stale start hint (another selection): closed")
    p.close()
    return None


def remember(key: str, map_entries: dict[str, int] | None) -> None:
    """After the first load of this process: let the next start with its options preload `key`."""
    global _name
    with _lock:
        name, _name = _name, ""  # "": later loads (a daemon's new config) do not rewrite the start's hint
    if not name:
        return
    path = _hint_path(name)
    sizes = dict(map_entries or {})
    if _read_hint(path) == (key, sizes):
        return
    data = json.dumps({"key": key, "map_entries": sizes}).encode()
    if bpf_cache.write_file(path, data) is not None:
        _prune(path.parent)


def _prune(directory: Path) -> None:
    """Keep the MAX_HINTS newest hints."""
    try:
        hints = sorted(directory.glob(f"*{HINT_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in hints[MAX_HINTS:]:
            p.unlink(missing_ok=True)
    except OSError:
        pass
