"""The overhead governor's control law against a simulated agent whose cost is fixed + k x frequency.

The real agent, driven over its budget, is tests/integration/test_governor.py; here the arithmetic:
settling, the floor, the ceiling, the deadband, and readings restarting after a change.
"""

from __future__ import annotations

import random

from agent.daemon.governor import (
    DEADBAND,
    GOVERN_PERIOD_S,
    MAX_HEAP_SAMPLE_BYTES,
    MAX_STEP,
    OFFCPU_STEP_NS,
    Governor,
    Reading,
    Steered,
    steered,
)

CPUS = 2


class Plant:
    """An agent whose CPU cost per second is `fixed_s` + `per_hz_s` x frequency, +- `noise` (relative)."""

    def __init__(self, fixed_s: float, per_hz_s: float, noise: float = 0.0, seed: int = 1) -> None:
        self.fixed_s, self.per_hz_s, self.noise = fixed_s, per_hz_s, noise
        self.rng = random.Random(seed)
        self.t = self.cpu = 0.0

    def advance(self, hz: int, seconds: float) -> Reading:
        rate = (self.fixed_s + self.per_hz_s * hz) * (1 + self.rng.uniform(-self.noise, self.noise))
        self.t += seconds
        self.cpu += rate * seconds
        return Reading(self.t, self.cpu * 0.8, self.cpu * 0.2)  # process and BPF shares: only the sum counts

    def cost(self, hz: int) -> float:
        return self.fixed_s + self.per_hz_s * hz


def drive(gov: Governor, plant: Plant, steps: int) -> list[int]:
    gov.observe(plant.advance(gov.frequency_hz, 0))
    out = []
    for _ in range(steps):
        gov.observe(plant.advance(gov.frequency_hz, GOVERN_PERIOD_S))
        new = gov.decide()
        if new is not None:
            gov.applied(new)
        out.append(gov.frequency_hz)
    return out


def test_settles_within_budget_from_far_over_it():
    gov = Governor(cpu_percent=3, floor_hz=19, ceiling_hz=4000, cpus=CPUS)  # 0.06 CPU s/s
    plant = Plant(fixed_s=0.01, per_hz_s=0.0001, noise=0.05)  # 0.41 at 4000 Hz: 7x over
    curve = drive(gov, plant, 12)  # a minute
    assert min(curve) >= 19 and max(curve) <= 4000
    for hz in curve[-4:]:
        assert abs(plant.cost(hz) / gov.budget - 1) <= 0.2, (curve, plant.cost(hz))
    assert curve[0] == 4000 // MAX_STEP  # one decision moves at most MAX_STEP


def test_never_below_the_floor_and_says_it_is_still_over():
    gov = Governor(cpu_percent=1, floor_hz=49, ceiling_hz=999, cpus=CPUS)
    plant = Plant(fixed_s=0.05, per_hz_s=0.0001)  # the fixed part alone is over 0.02
    curve = drive(gov, plant, 10)
    assert curve[-1] == 49 and min(curve) == 49
    assert gov.at_floor_over_budget


def test_raises_back_to_the_configured_frequency_when_there_is_room():
    gov = Governor(cpu_percent=3, floor_hz=19, ceiling_hz=999, cpus=CPUS)
    busy = Plant(fixed_s=0.05, per_hz_s=0.0002)
    drive(gov, busy, 8)
    assert gov.frequency_hz < 200
    quiet = Plant(fixed_s=0.001, per_hz_s=0.00001)  # the load went away
    quiet.t, quiet.cpu = busy.t, busy.cpu
    curve = drive(gov, quiet, 8)
    assert curve[-1] == 999


def test_within_the_deadband_nothing_changes():
    gov = Governor(cpu_percent=5, floor_hz=19, ceiling_hz=500, cpus=CPUS)
    per_hz = gov.budget * (1 + DEADBAND / 2) / 500
    curve = drive(gov, Plant(fixed_s=0.0, per_hz_s=per_hz), 6)
    assert curve == [500] * 6 and gov.changes == 0


def test_off_at_zero_percent_and_when_floor_is_the_frequency():
    assert not Governor(cpu_percent=0, floor_hz=19, ceiling_hz=99, cpus=CPUS).enabled
    assert not Governor(cpu_percent=1, floor_hz=99, ceiling_hz=99, cpus=CPUS).enabled
    assert Governor(cpu_percent=1, floor_hz=200, ceiling_hz=99, cpus=CPUS).floor_hz == 99


def test_a_decision_uses_only_readings_taken_at_the_current_frequency():
    gov = Governor(cpu_percent=3, floor_hz=19, ceiling_hz=4000, cpus=CPUS)
    gov.observe(Reading(0.0, 0.0, 0.0))
    gov.observe(Reading(5.0, 5.0, 0.0))  # a full CPU: far over
    new = gov.decide()
    assert new is not None
    gov.applied(new)
    assert gov.cost() is None  # one reading left: the next decision waits for a period at the new frequency
    gov.observe(Reading(10.0, 5.3, 0.0))
    assert abs(gov.cost() - 0.06) < 1e-9


def test_the_other_families_follow_the_frequency():
    assert steered(99, 99, 512 * 1024, 0) == Steered(99, 512 * 1024, 0)  # at the ceiling: as configured
    quarter = steered(25, 100, 512 * 1024, 1_000_000)
    assert quarter == Steered(25, 4 * 512 * 1024, 1_000_000 + 3 * OFFCPU_STEP_NS)
    assert steered(1, 20_000, 1 << 20, 0).heap_sample_bytes == MAX_HEAP_SAMPLE_BYTES
