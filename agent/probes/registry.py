"""The probe families `--profile` can name, in the order profiles are written.

Each family's module is imported when it is first looked up, not when the
registry is: a start that records CPU alone does not pay for the heap,
goroutine, lock and off-CPU modules (their Go and ELF readers).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from agent.probes.family import ProbeFamily


class FamilyRegistry(Mapping[str, type[ProbeFamily]]):
    """name -> family class, from (module, class name) pairs, each imported on first lookup."""

    def __init__(self, where: dict[str, tuple[str, str]]) -> None:
        self._where = dict(where)
        self._loaded: dict[str, type[ProbeFamily]] = {}

    def __getitem__(self, name: str) -> type[ProbeFamily]:
        cls = self._loaded.get(name)
        if cls is None:
            module, attr = self._where[name]
            cls = self._loaded[name] = getattr(importlib.import_module(module), attr)
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


PROBES: Mapping[str, type[ProbeFamily]] = FamilyRegistry({
    "cpu": ("agent.probes.cpu", "CpuProbe"),
    "heap": ("agent.probes.heap", "HeapProbe"),
    "offcpu": ("agent.probes.offcpu", "OffCpuProbe"),
    "lock": ("agent.probes.lock", "LockProbe"),
    "goroutine": ("agent.probes.goroutine", "GoroutineProbe"),
})
