"""Relabel and redact rules, applied to every Profile before it is exported.

Actions (config key `relabel`, in order):

  drop          drop samples whose attribute fully matches `regex`
  keep          keep only samples whose attribute fully matches `regex`
  drop_label    remove labels whose name fully matches `label`
  rename_label  rename labels whose name fully matches `label` to `target`
  mask          in labels whose name fully matches `label`, replace what `regex` matches by `replacement`

Attributes a drop/keep rule can test: process.pid, process.name (comm),
process.executable.name, process.executable.path, container.id,
service.name, thread.id, thread.name and label.NAME (a sample label). A
missing attribute is the empty string, so `regex: ""` matches its absence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from agent.daemon.config import RelabelRule
from exporters.profile import ProcessMeta, Profile, Sample, SampleKey

_LABEL = "label."


@dataclass
class RelabelStats:
    dropped_samples: int = 0
    masked_values: int = 0


class _Compiled:
    def __init__(self, rule: RelabelRule) -> None:
        self.rule = rule
        self.regex = re.compile(rule.regex) if rule.regex or rule.action in ("drop", "keep") else None
        self.label = re.compile(rule.label) if rule.label else None


def attribute(key: SampleKey, meta: ProcessMeta | None, name: str) -> str:
    """The value of a drop/keep attribute for one sample, as a string."""
    if name.startswith(_LABEL):
        want = name[len(_LABEL):]
        return next((v for k, v in key.labels if k == want), "")
    m = meta or ProcessMeta(pid=key.pid)
    exe_name = m.executable_path.rsplit("/", 1)[-1] if m.executable_path else m.name
    values = {
        "process.pid": str(key.pid), "process.name": m.name, "process.executable.name": exe_name,
        "process.executable.path": m.executable_path, "container.id": m.container_id,
        "service.name": m.service_name or exe_name, "thread.id": str(key.tid), "thread.name": key.thread_name,
    }
    return values.get(name, "")


class Relabeler:
    """Applies the rules of one config; rebuilt on reload."""

    def __init__(self, rules: Sequence[RelabelRule]) -> None:
        self.rules = [_Compiled(r) for r in rules]
        self.stats = RelabelStats()

    def apply(self, profile: Profile) -> Profile:
        """A new Profile with the rules applied (the input is left as it was)."""
        if not self.rules:
            return profile
        out = replace(profile, samples=[], processes={})
        for sample in profile.samples:
            key = self._key(sample.key, profile.processes.get(sample.key.pid))
            if key is None:
                self.stats.dropped_samples += sum(sample.values[:1]) or 1
                continue
            if key is sample.key:
                out.samples.append(Sample(key, list(sample.values), list(sample.timestamps_ns)))
            else:  # relabelled keys may merge
                for i, ts in enumerate(sample.timestamps_ns or [None]):
                    share = sample.values if i == 0 else [0] * len(sample.values)
                    out.add(key, share, ts)
        pids = {s.key.pid for s in out.samples}
        out.processes = {pid: meta for pid, meta in profile.processes.items() if pid in pids}
        return out

    def _key(self, key: SampleKey, meta: ProcessMeta | None) -> SampleKey | None:
        labels = key.labels
        for c in self.rules:
            r = c.rule
            if r.action in ("drop", "keep"):
                hit = c.regex.fullmatch(attribute(replace(key, labels=labels), meta, r.attribute)) is not None
                if hit == (r.action == "drop"):
                    return None
            elif r.action == "drop_label":
                labels = tuple((k, v) for k, v in labels if not c.label.fullmatch(k))
            elif r.action == "rename_label":
                labels = tuple((r.target if c.label.fullmatch(k) else k, v) for k, v in labels)
            elif r.action == "mask":
                new = []
                for k, v in labels:
                    if c.label.fullmatch(k):
                        masked = c.regex.sub(r.replacement, v)
                        if masked != v:
                            self.stats.masked_values += 1
                        v = masked
                    new.append((k, v))
                labels = tuple(new)
        return key if labels == key.labels else replace(key, labels=labels)
