"""The overhead governor's control law against simulated agents: one whose cost is fixed + k x frequency,
and one whose families cost each in proportion to its own rate.

The real agent, driven over its budget, is tests/integration/test_governor.py; here the arithmetic:
settling, the floor, the ceiling, the deadband, readings restarting after a change, and the costliest
family shedding first.
"""

from __future__ import annotations

import random

from agent.daemon.governor import (
    BPF_NS_PER_SAMPLE_ESTIMATE,
    DEADBAND,
    GOVERN_PERIOD_S,
    MAX_HEAP_SAMPLE_BYTES,
    MAX_STEP,
    OFFCPU_STEP_NS,
    CostMeter,
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


def test_each_family_rate_from_its_factor():
    assert steered({}, 99, 512 * 1024, 0) == Steered(99, 512 * 1024, 0)  # no factor: as configured
    quarter = steered({"cpu": 0.25, "heap": 0.25, "offcpu": 0.25}, 100, 512 * 1024, 1_000_000)
    assert quarter == Steered(25, 4 * 512 * 1024, 1_000_000 + 3 * OFFCPU_STEP_NS)
    assert steered({"heap": 1 / 20_000}, 20_000, 1 << 20, 0).heap_sample_bytes == MAX_HEAP_SAMPLE_BYTES
    only_offcpu = steered({"offcpu": 0.5}, 99, 4096, 0)
    assert only_offcpu == Steered(99, 4096, OFFCPU_STEP_NS)


class Families:
    """An agent whose families each cost in proportion to their own rate: `full[name]` CPU s/s at the
    configured rate, a fifth of it in BPF, the rest in the agent as one record per millisecond of cost."""

    def __init__(self, full: dict[str, float]) -> None:
        self.full = full
        self.t = self.cpu = self.bpf_total = 0.0
        self.bpf: dict[str, float] = dict.fromkeys(full, 0.0)
        self.records: dict[str, int] = dict.fromkeys(full, 0)

    def cost(self, factors: dict[str, float]) -> dict[str, float]:
        return {name: c * factors.get(name, 1.0) for name, c in self.full.items()}

    def advance(self, factors: dict[str, float], seconds: float) -> Reading:
        self.t += seconds
        for name, c in self.cost(factors).items():
            self.cpu += 0.8 * c * seconds
            self.bpf[name] += 0.2 * c * seconds
            self.bpf_total += 0.2 * c * seconds
            self.records[name] += round(0.8 * c * seconds * 1000)
        return Reading(self.t, self.cpu, self.bpf_total, dict(self.bpf), dict(self.records))


def drive_families(gov: Governor, plant: Families, steps: int) -> list[dict[str, float]]:
    gov.observe(plant.advance(gov.factors, 0))
    out = []
    for _ in range(steps):
        gov.observe(plant.advance(gov.factors, GOVERN_PERIOD_S))
        new = gov.decide()
        if new is not None:
            gov.applied(new)
        out.append(dict(gov.factors))
    return out


def test_costs_by_family_are_own_bpf_plus_a_share_of_the_agent_by_records():
    gov = Governor(cpu_percent=50, floor_hz=19, ceiling_hz=999, cpus=CPUS)
    plant = Families({"cpu": 0.05, "offcpu": 0.15, "lock": 0.02})
    gov.observe(plant.advance(gov.factors, 0))
    gov.observe(plant.advance(gov.factors, GOVERN_PERIOD_S))
    costs = gov.family_costs()
    for name, c in plant.full.items():
        assert abs(costs[name] - c) < 1e-3, costs
    assert abs(sum(costs.values()) - gov.cost()) < 1e-9


def test_the_costliest_family_sheds_first():
    # 0.04 CPU s/s budget; off-CPU costs 0.06, cpu 0.01: off-CPU alone can shed the excess.
    gov = Governor(cpu_percent=2, floor_hz=19, ceiling_hz=999, cpus=CPUS)
    plant = Families({"cpu": 0.01, "offcpu": 0.06})
    curve = drive_families(gov, plant, 6)
    assert all(f["cpu"] == 1.0 for f in curve), curve  # the cheap family keeps its rate
    assert curve[-1]["offcpu"] < 0.6, curve
    assert abs(sum(plant.cost(curve[-1]).values()) / gov.budget - 1) <= DEADBAND, curve


def test_what_one_family_cannot_shed_the_next_costliest_does():
    # Budget 0.02; cpu costs 0.30, offcpu 0.10: one step of cpu's (/ MAX_STEP) cannot shed 0.38, so
    # off-CPU sheds too, and the costlier family ends the lower.
    gov = Governor(cpu_percent=1, floor_hz=19, ceiling_hz=999, cpus=CPUS)
    plant = Families({"cpu": 0.30, "offcpu": 0.10, "lock": 0.002})
    curve = drive_families(gov, plant, 12)
    first = curve[0]
    assert first["cpu"] == 1 / MAX_STEP and first["offcpu"] < 1.0, first  # cpu's step could not shed it all
    assert gov.floor <= curve[-1]["cpu"] < curve[-1]["offcpu"] < 1.0, curve
    assert curve[-1]["heap"] == 1.0  # no record, no cost: not cut
    assert abs(sum(plant.cost(curve[-1]).values()) / gov.budget - 1) <= 0.2, curve
    assert not gov.at_floor_over_budget


def test_room_goes_back_to_the_cheapest_family_first_then_all_reach_their_rates():
    gov = Governor(cpu_percent=2, floor_hz=19, ceiling_hz=999, cpus=CPUS)
    gov.factors.update(cpu=0.1, offcpu=0.1)
    plant = Families({"cpu": 0.01, "offcpu": 0.02})  # 0.003 at these factors, the budget 0.04
    curve = drive_families(gov, plant, 8)
    assert curve[0]["cpu"] == 0.1 * MAX_STEP and curve[0]["offcpu"] == 0.1 * MAX_STEP
    assert curve[-1] == {"cpu": 1.0, "heap": 1.0, "offcpu": 1.0}, curve
    gov2 = Governor(cpu_percent=2, floor_hz=19, ceiling_hz=999, cpus=CPUS)
    gov2.factors.update(cpu=0.5, offcpu=0.5)
    curve = drive_families(gov2, Families({"cpu": 0.02, "offcpu": 0.04}), 1)  # 0.03 now; room for 0.01 more
    assert curve[0]["cpu"] == 1.0 and abs(curve[0]["offcpu"] - 0.5) < 1e-9, curve  # the cheap one takes it


def test_only_the_selected_families_with_a_rate_are_steered():
    gov = Governor(cpu_percent=1, floor_hz=19, ceiling_hz=99, cpus=CPUS, families=["offcpu", "lock"])
    assert gov.factors == {"offcpu": 1.0} and gov.enabled
    assert not Governor(cpu_percent=1, floor_hz=19, ceiling_hz=99, cpus=CPUS, families=["lock"]).enabled


def test_cost_meter_keeps_counts_rising_across_a_restart_of_the_probes():
    meter = CostMeter(use_bpf_stats=True)
    a = meter.read({"cpu": 5_000_000_000, "shared": 1_000_000_000}, 10, {"cpu": 100})
    b = meter.read({"cpu": 1_000_000_000, "shared": 0}, 20, {"cpu": 7})  # new programs and pipeline
    assert a.bpf_s == 6.0 and b.bpf_s == 7.0
    assert b.family_bpf_s == {"cpu": 6.0, "shared": 1.0} and b.family_records == {"cpu": 107}
    est = CostMeter(use_bpf_stats=False).read({}, 1000, {"cpu": 800, "offcpu": 200})
    assert est.bpf_s == 1000 * BPF_NS_PER_SAMPLE_ESTIMATE / 1e9
    assert est.family_bpf_s == {"cpu": 800 * BPF_NS_PER_SAMPLE_ESTIMATE / 1e9, "offcpu": 200 * BPF_NS_PER_SAMPLE_ESTIMATE / 1e9}


def test_builds_count_spread_over_their_interval_so_windows_agree(monkeypatch):
    """An interval's build is a burst once per export interval: 5 s windows with and without one differed
    by the whole build and the governor hunted around its budget. Counted at the last build's rate, every
    window after the first build costs the same."""
    from agent.daemon import governor

    cpu = [0.0]
    monkeypatch.setattr(governor, "own_cpu_s", lambda: cpu[0])
    meter = CostMeter(use_bpf_stats=False)
    sampling, build = 0.01, 0.05  # CPU s/s of the sampling thread; CPU s of each build, every 10 s
    readings = [meter._agent_cpu_s(0.0)]
    for step in range(1, 13):  # 5 s steps; a build at the end of every other one
        cpu[0] += sampling * 5
        if step % 2 == 0:
            cpu[0] += build
            meter.built(build, 10.0)
        readings.append(meter._agent_cpu_s(step * 5.0))
    windows = [(b - a) / 5 for a, b in zip(readings[2:], readings[3:], strict=False)]
    assert all(abs(w - (sampling + build / 10)) < 1e-9 for w in windows), windows
    assert abs(readings[-1] - cpu[0]) <= build, "the CPU counted stays within a build of the process's own"
