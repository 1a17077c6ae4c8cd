"""`bpfprof diff`'s ranking and test (exporters/diff.py), its bad inputs, and the pages it and `record` write.

Profiles here are binomial draws with a known split, so the truth of each
change is known: a real shift must be named with its size, and two draws of
the same split must name nothing (seeded, so never flaky).
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from exporters.diff import _holm, _p_two_proportions, function_values, rank_changes
from exporters.pprof import encode_pprof
from exporters.profile import Location, SampleKey
from exporters.profile_types import cpu_profile, empty_profile
from recording import run_bpfprof
from symbolizer.frames import Frame, FrameKind
from viewer.report import diff_data, encode_html

PERIOD_NS = 10_101_010


def _loc(name: str) -> Location:
    return Location(hash(name) & 0xFFFFFF, None, (Frame(function=name, kind=FrameKind.GO),))


MAIN, A, B, GC = _loc("main.main"), _loc("main.spinA"), _loc("main.spinB"), _loc("runtime.gcBgMarkWorker")


def split_profile(share_a: float, samples: int, seed: int):
    """CPU profile: `samples` draws, spinA with probability share_a*0.95, spinB the rest of 95 %, GC 5 %."""
    rng = random.Random(seed)
    p = cpu_profile(0, 10**10, 99)
    for _ in range(samples):
        r = rng.random()
        stack = (A, MAIN) if r < 0.95 * share_a else (B, MAIN) if r < 0.95 else (GC,)
        p.add(SampleKey(stack=stack, pid=1, tid=1, thread_name="t"), [1, PERIOD_NS])
    return p


def test_z_test_and_holm_against_hand_computed_values():
    # z = 0.2 / sqrt(0.6 * 0.4 * (2/100)) = 2.8868: two-sided p = erfc(z / sqrt 2)
    assert _p_two_proportions(50, 100, 70, 100) == pytest.approx(math.erfc(2.886751 / math.sqrt(2)), rel=1e-5)
    assert _p_two_proportions(0, 10, 0, 10) == 1.0
    # Holm: sorted p 0.01, 0.02, 0.04 times 3, 2, 1, made monotone.
    assert _holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])


@pytest.mark.parametrize("value_index", [0, 1], ids=["samples", "cpu"])
def test_a_real_shift_is_named_first_with_sign_and_size(value_index):
    base, new = split_profile(0.7, 8000, 1), split_profile(0.4, 8000, 2)
    changes = rank_changes(function_values(base, value_index), function_values(new, value_index))
    first = {c.function: c for c in changes[:4]}
    assert set(first) == {"main.spinA", "main.spinB"}, changes[:4]
    truth = 100 * 0.95 * 0.3
    assert first["main.spinA"].points == pytest.approx(-truth, abs=3)
    assert first["main.spinB"].points == pytest.approx(truth, abs=3)
    assert all(c.significant for c in changes[:4])
    assert not any(c.significant for c in changes if c.function in ("main.main", "runtime.gcBgMarkWorker"))


def test_same_split_names_nothing_significant():
    for seed in range(10):
        base, new = split_profile(0.7, 5000, 100 + seed), split_profile(0.7, 5000, 200 + seed)
        changes = rank_changes(function_values(base, 1), function_values(new, 1))
        assert not [c for c in changes if c.significant], (seed, changes[:3])


def test_untested_without_a_count_type():
    p = empty_profile("heap", 0, 10**9)
    p.sample_types = p.sample_types[1:2]  # alloc_space only
    p.add(SampleKey(stack=(A,), pid=1, tid=1, thread_name=""), [100])
    changes = rank_changes(function_values(p, 0), function_values(p, 0))
    assert changes and all(c.p_value is None and not c.significant for c in changes)


def test_diff_page_scales_the_base_to_the_new_total():
    base, new = split_profile(0.7, 2000, 1), split_profile(0.4, 4000, 2)
    data = diff_data(base, new, 0, "t")
    fg = data["flamegraph"]
    assert fg["total"] == 4000 and fg["base_raw_total"] == 2000
    assert fg["base_total"] == pytest.approx(4000, abs=0.01)
    assert data["changes"][0]["function"] in ("main.spinA", "main.spinB")


def test_html_page_carries_its_data_and_no_reference_out():
    p = split_profile(0.7, 500, 3)
    p.comments.append("a note with </script> in it")
    page = encode_html(p, [("command", "./app </script><b>")]).decode()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    raw = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(raw)
    assert data["facts"][0] == ["command", "./app </script><b>"]
    assert sum(data["selves"]["samples"]) == 500 and data["type"] == "cpu"


def _one_line_error(proc, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    good = d / "good.pb.gz"
    good.write_bytes(encode_pprof(split_profile(0.7, 300, 1)))
    heap = empty_profile("heap", 0, 10**9)
    heap.add(SampleKey(stack=(A,), pid=1, tid=1, thread_name=""), [1, 100, 1, 100])
    (d / "heap.pb.gz").write_bytes(encode_pprof(heap))
    (d / "empty.pb.gz").write_bytes(encode_pprof(cpu_profile(0, 10**9, 99)))
    (d / "corrupt.pb.gz").write_bytes(good.read_bytes()[:40])
    (d / "corrupt.otlp").write_bytes(b"\x0a\xff\xff\xff\x0fnot a protobuf")
    return d


@pytest.mark.parametrize(("other", "words"), [("heap.pb.gz", ["cpu profile", "heap profile"]),
                                              ("empty.pb.gz", ["empty.pb.gz", "empty"]),
                                              ("corrupt.pb.gz", ["corrupt.pb.gz", "gzip"])])
def test_diff_bad_input_is_one_line_exit_2(files, other, words):
    _one_line_error(run_bpfprof("diff", str(files / "good.pb.gz"), str(files / other), check=False), *words)


def test_diff_missing_sample_type_is_one_line_exit_2(files):
    proc = run_bpfprof("diff", str(files / "good.pb.gz"), str(files / "good.pb.gz"), "--sample-type", "inuse_space",
                       check=False)
    _one_line_error(proc, "no sample type 'inuse_space'")


@pytest.mark.parametrize(("args", "words"), [(["empty.pb.gz"], ["empty.pb.gz", "empty"]),
                                             (["corrupt.pb.gz"], ["corrupt.pb.gz", "gzip"]),
                                             (["corrupt.otlp"], ["corrupt.otlp", "OTLP"]),
                                             (["--type", "cpu", "good.pb.gz", "heap.pb.gz"], ["heap.pb.gz", "no cpu"])])
def test_view_bad_input_is_one_line_exit_2(files, args, words):
    args = [a if a.startswith("-") or a == "cpu" else str(files / a) for a in args]
    _one_line_error(run_bpfprof("view", *args, check=False), *words)


def test_diff_of_a_file_with_itself_prints_no_significant_change(files, tmp_path):
    out = tmp_path / "d.html"
    proc = run_bpfprof("diff", str(files / "good.pb.gz"), str(files / "good.pb.gz"), "--html", str(out))
    assert "0 significant change(s)" in proc.stdout
    assert out.read_bytes().startswith(b"<!doctype html>")
