"""The probe families `--profile` can name, in the order profiles are written."""

from __future__ import annotations

from agent.probes.cpu import CpuProbe
from agent.probes.family import ProbeFamily
from agent.probes.goroutine import GoroutineProbe
from agent.probes.heap import HeapProbe
from agent.probes.lock import LockProbe
from agent.probes.offcpu import OffCpuProbe

PROBES: dict[str, type[ProbeFamily]] = {
    "cpu": CpuProbe,
    "heap": HeapProbe,
    "offcpu": OffCpuProbe,
    "lock": LockProbe,
    "goroutine": GoroutineProbe,
}
