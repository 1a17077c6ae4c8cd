"""Relabel and redact rules on Profiles."""

from __future__ import annotations

from agent.daemon.config import RelabelRule
from agent.daemon.relabel import Relabeler
from exporters.profile import ProcessMeta, SampleKey
from exporters.profile_types import cpu_profile


def profile():
    p = cpu_profile(0, 10**9, 100)
    p.processes = {1: ProcessMeta(1, "sshd", "/usr/sbin/sshd"), 2: ProcessMeta(2, "app", "/opt/app", "c" * 64)}
    p.add(SampleKey((), 1, 1, "sshd", (("user", "root"),)), [1, 10], 100)
    p.add(SampleKey((), 2, 2, "app", (("url", "/a?token=abc&x=1"), ("uid", "7"))), [2, 20], 200)
    p.add(SampleKey((), 2, 3, "app", (("url", "/b?token=zzz"), ("uid", "7"))), [1, 10], 300)
    return p


def test_no_rules_is_identity():
    p = profile()
    assert Relabeler([]).apply(p) is p


def test_drop_by_process_attribute_removes_process_meta():
    r = Relabeler([RelabelRule("drop", attribute="process.executable.name", regex="sshd")])
    out = r.apply(profile())
    assert {s.key.pid for s in out.samples} == {2} and set(out.processes) == {2}
    assert r.stats.dropped_samples == 1


def test_keep_by_container():
    out = Relabeler([RelabelRule("keep", attribute="container.id", regex=".+")]).apply(profile())
    assert {s.key.pid for s in out.samples} == {2}


def test_keep_by_label_and_missing_attribute():
    out = Relabeler([RelabelRule("keep", attribute="label.user", regex="root")]).apply(profile())
    assert {s.key.pid for s in out.samples} == {1}


def test_mask_rename_drop_label_and_merge():
    rules = [RelabelRule("mask", label="url", regex=r"token=[^&]*", replacement="token=***"),
             RelabelRule("rename_label", label="uid", target="user_id"),
             RelabelRule("mask", label="url", regex=r"^/[ab]", replacement="/p"),
             RelabelRule("drop_label", label="user")]
    r = Relabeler(rules)
    src = profile()
    out = r.apply(src)
    labels = sorted(s.key.labels for s in out.samples)
    assert labels == [(), (("url", "/p?token=***"), ("user_id", "7")), (("url", "/p?token=***&x=1"), ("user_id", "7"))]
    assert out.total(0) == src.total(0) and out.total(1) == src.total(1)
    assert sorted(ts for s in out.samples for ts in s.timestamps_ns) == [100, 200, 300]
    assert "token=abc" in str(src.samples[1].key.labels)  # the input is untouched
    assert r.stats.masked_values >= 2
