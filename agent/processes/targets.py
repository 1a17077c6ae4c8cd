"""What to profile: existing processes by pid, or a command bpfprof starts.

A started command is held before exec until its pid is a BPF target, so
neither its first instructions nor its first children escape the profile.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

from agent.errors import TargetError


def running_pids() -> list[int]:
    """Every process running now but this one (what a whole-system capture starts with)."""
    own = os.getpid()
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != own]


def _pid_exists(pid: int) -> bool:
    import psutil  # noqa: PLC0415  (not at import: a whole-system capture never asks, and it costs 10 ms)

    return psutil.pid_exists(pid)


def validate_pids(pids: Sequence[int]) -> list[int]:
    """Return the pids if every one names a live process; TargetError otherwise."""
    out = []
    for pid in pids:
        if pid <= 0 or not _pid_exists(pid):
            raise TargetError(f"no process with pid {pid}")
        out.append(pid)
    return out


def validate_command(argv: Sequence[str]) -> list[str]:
    """Return argv if its program can be found; TargetError otherwise (checked before BPF is loaded)."""
    if not argv:
        raise TargetError("no command given after --")
    if shutil.which(argv[0]) is None:
        raise TargetError(f"command not found: {argv[0]}")
    return list(argv)


class GatedCommand:
    """A child process held before exec until release() is called.

    Popen returns only once the child has exec'd, so the gate cannot be a
    preexec_fn that blocks: a shell stops itself with SIGSTOP, and once its
    pid is a BPF target, SIGCONT lets it exec the command in place (same pid).
    """

    GATE = 'kill -STOP $$; exec "$@"'
    STOP_WAIT_S = 10.0

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """`env`: variables to add to the command's environment (the heap sampler's LD_PRELOAD)."""
        exe = validate_command(argv)[0]
        try:
            self.process = subprocess.Popen(["/bin/sh", "-c", self.GATE, "bpfprof-gate", *argv],
                                            env={**os.environ, **env} if env else None)
        except OSError as e:
            raise TargetError(f"cannot start {exe}: {e.strerror}") from e
        self.pid = self.process.pid
        self._released = False
        self._wait_stopped()

    def _wait_stopped(self) -> None:
        if wait_stopped(self.pid, self.STOP_WAIT_S, gone=lambda: self.process.poll() is not None):
            return
        if self.process.poll() is not None:
            raise TargetError(f"{argv0(self.process)} exited before it could be profiled")
        self.kill()
        raise TargetError("the command did not start in time")

    def release(self) -> None:
        """Let the command exec and run."""
        if not self._released:
            self._released = True
            os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Stop an unreleased or running command (used when set-up fails)."""
        if self.process.poll() is None:
            self.process.kill()
            self.release()
            self.process.wait()


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, T, ...); "X" when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return "X"


def wait_stopped(pid: int, timeout_s: float, gone: Callable[[], bool] | None = None) -> bool:
    """Whether `pid` is stopped (SIGSTOP) within `timeout_s`; False at once if it is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = process_state(pid)
        if state in ("T", "t"):
            return True
        if state in ("X", "Z") or (gone is not None and gone()) or time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


def argv0(process: subprocess.Popen) -> str:
    args = process.args
    return str(args[3] if isinstance(args, list) and len(args) > 3 else args)


def gated_command_path(pid: int) -> str | None:
    """The program the GatedCommand shell `pid` is about to exec, else None: probes attach to it before it runs."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="surrogateescape") for a in f.read().split(b"\0")]
    except OSError:
        return None
    if len(argv) > 4 and argv[1] == "-c" and argv[2] == GatedCommand.GATE and argv[3] == "bpfprof-gate":
        return shutil.which(argv[4])
    return None
