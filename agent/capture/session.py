"""`bpfprof record`: one capture through the capture pipeline, cut once at the end.

The pipeline (agent/capture/pipeline.py) is the one the daemon drives too;
a capture adds the command bpfprof starts (gated until the probes are in),
the duration, and the progress line.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.bpfload.records import Loss
from agent.capture.pipeline import DRAIN_INTERVAL_S, CapturePipeline, Interval
from agent.probes.family import ProbeConfig
from agent.processes.stack_resolver import DEFAULT_UNWIND, DEFAULT_USTACK_BYTES, UnwindMode
from agent.processes.targets import GatedCommand
from agent.processes.tracker import ProcessTracker
from exporters.profile import Profile
from symbolizer.kallsyms import KernelSymbols

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordOptions:
    """What to record. `pids` None and `command` None: the whole system."""

    frequency_hz: int = 99
    duration_s: float | None = None
    pids: tuple[int, ...] | None = None
    command: tuple[str, ...] | None = None
    with_kernel: bool = True
    profiles: tuple[str, ...] = ("cpu",)
    offcpu_min_ns: int = 0
    heap_sample_bytes: int = 512 * 1024
    unwind: UnwindMode = DEFAULT_UNWIND  # CPU samples: CFI walk of a stack copy, or frame pointers
    ustack_bytes: int = DEFAULT_USTACK_BYTES  # stack copied per CPU sample for the CFI walk


@dataclass
class CaptureStats:
    """Progress of a capture, for the live line and the final report."""

    elapsed_s: float = 0.0
    samples: int = 0
    processes: int = 0
    losses: list[Loss] = field(default_factory=list)  # what was lost or cut short, by reason
    command_exit: int | None = None  # Popen.returncode: negative is the signal that ended it
    first_sample_s: float | None = None  # since this process started: the start-up cost users wait for
    unwind: str | None = None  # how the BPF walker did (UnwindTables.summary), if it ran

    @property
    def command_status(self) -> int:
        """The command's exit status as a shell reports it (128+N if signal N ended it); 0 if there
        was no command, or it was still running when the capture ended."""
        if self.command_exit is None:
            return 0
        return 128 - self.command_exit if self.command_exit < 0 else self.command_exit

    def drop_lines(self) -> list[str]:
        """'N samples lost (ring buffer full)', one line per reason."""
        return [loss.line() for loss in self.losses]

    def lost(self, reason: str) -> int:
        """How many were lost for `reason` (a Drop name in lower case, or a family's reason)."""
        return sum(loss.count for loss in self.losses if loss.reason == reason)


class RecordSession:
    """One capture. run() blocks until the duration ends, the command exits or `stop` is set."""

    def __init__(self, options: RecordOptions, tracker: ProcessTracker | None = None) -> None:
        self.options = options
        self.tracker = tracker if tracker is not None else ProcessTracker()
        config = ProbeConfig(frequency_hz=options.frequency_hz, with_kernel=options.with_kernel,
                             offcpu_min_ns=options.offcpu_min_ns, pids=options.pids,
                             heap_sample_bytes=options.heap_sample_bytes, own_command=bool(options.command),
                             unwind=options.unwind, ustack_bytes=options.ustack_bytes)
        # A command: BPF records only it and its children (added once it is forked); pids: only them.
        targets = () if options.command else options.pids
        self.pipeline = CapturePipeline(config, options.profiles, self.tracker, targets=targets,
                                        follow_children=bool(options.command))
        self.stats = CaptureStats()
        self._interval: Interval | None = None

    def run(self, stop: threading.Event, progress: Callable[[CaptureStats], None] | None = None,
            on_start: Callable[[], None] | None = None) -> CaptureStats:
        """Record; returns the final stats. BpfprofError if set-up fails.

        `on_start` is called once the probes are attached and recording.
        """
        opts = self.options
        pipeline = self.pipeline
        command = None
        pipeline.load()
        try:
            if opts.command:
                command = GatedCommand(opts.command, pipeline.command_env())
                pipeline.add_target(command.pid)
            pipeline.start()
            start = time.monotonic()
            if on_start is not None:
                on_start()
            if command is not None:
                command.release()
            while not stop.is_set():
                # the capture's clock: its duration, the command's exit and the progress line
                pipeline.poll(DRAIN_INTERVAL_S)
                self.stats.elapsed_s = time.monotonic() - start
                self.stats.samples = pipeline.samples
                self.stats.processes = self.tracker.stats.processes
                if progress is not None:
                    progress(self.stats)
                if opts.duration_s is not None and self.stats.elapsed_s >= opts.duration_s:
                    break
                if command is not None and command.process.poll() is not None:
                    break
            self._interval = pipeline.cut()
            self.stats.losses = self._interval.losses
            self.stats.unwind = pipeline.unwind_summary()
        finally:
            pipeline.close()
            if command is not None:
                if command.process.poll() is None and stop.is_set():
                    command.process.terminate()
                try:
                    self.stats.command_exit = command.process.wait(timeout=5)
                except subprocess.TimeoutExpired:  # a command that ignores SIGTERM is left running
                    log.warning("command %d still running after the capture", command.pid)
        self.stats.samples = pipeline.samples
        self.stats.first_sample_s = pipeline.first_sample_s
        self.stats.processes = self.tracker.stats.processes
        return self.stats

    def build_profiles(self, kernel: KernelSymbols | None = None) -> list[Profile]:
        """Symbolize every record into one Profile per profile type, in PROBES order."""
        if self._interval is None:
            return []
        return self.pipeline.build(self._interval, kernel)

    def build_profile(self, kernel: KernelSymbols | None = None) -> Profile:
        """The first profile (the CPU one when it was recorded)."""
        return self.build_profiles(kernel)[0]
