"""The probe families `--profile` can name, in the order profiles are written."""

from __future__ import annotations

from agent.cpu_probe import CpuProbe
from agent.goroutine_probe import GoroutineProbe
from agent.heap_probe import HeapProbe
from agent.lock_probe import LockProbe
from agent.offcpu_probe import OffCpuProbe
from agent.probe import Probe

PROBES: dict[str, type[Probe]] = {
    "cpu": CpuProbe,
    "heap": HeapProbe,
    "offcpu": OffCpuProbe,
    "lock": LockProbe,
    "goroutine": GoroutineProbe,
}
