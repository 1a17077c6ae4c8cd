"""The in-process heap sampler library: it builds, preloads into real programs, samples as Go does,
and its absence (no compiler) is a logged fallback, not an error."""

from __future__ import annotations

import os
import subprocess
import sys

from agent.probes import heap_sampler


def test_builds_once_and_exports_its_probe_points(tmp_path, monkeypatch):
    monkeypatch.setenv("BPFPROF_CACHE_DIR", str(tmp_path))
    lib = heap_sampler.library()
    assert lib is not None and lib.is_relative_to(tmp_path)
    assert heap_sampler.library() == lib  # cached by source version
    sites = heap_sampler.sampler_sites(str(lib))
    assert sites is not None and sites.alloc_offset != sites.free_offset and sites.rate_vaddr


def test_preloaded_into_a_threaded_program_and_found_in_its_maps(tmp_path, monkeypatch):
    """A Python child with threads runs under it; its maps show the library; its rate is the one it was given."""
    monkeypatch.setenv("BPFPROF_CACHE_DIR", str(tmp_path))
    lib = heap_sampler.library()
    env = {**os.environ, **heap_sampler.preload_env(lib, 12345)}
    code = ("import sys, threading, json\n"
            "t = [threading.Thread(target=lambda: [json.dumps(list(range(500))) for _ in range(100)]) for _ in range(4)]\n"
            "[x.start() for x in t]; [x.join() for x in t]\n"
            "print('ready', flush=True); sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        found = heap_sampler.sampler_in(child.pid)
        assert found is not None
        sites, bias = found
        assert heap_sampler.read_rate(child.pid, sites, bias, 1) == 12345
    finally:
        child.stdin.close()
        assert child.wait(timeout=30) == 0


def test_no_compiler_means_no_sampler(tmp_path, monkeypatch):
    monkeypatch.setenv("BPFPROF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(heap_sampler.shutil, "which", lambda name: None)
    assert heap_sampler.library() is None


def test_preload_keeps_the_users_own(monkeypatch, tmp_path):
    monkeypatch.setenv("LD_PRELOAD", "/opt/theirs.so")
    env = heap_sampler.preload_env(tmp_path / "lib.so", 4096)
    assert env == {"LD_PRELOAD": f"{tmp_path / 'lib.so'} /opt/theirs.so", "BPFPROF_HEAP_RATE": "4096"}
