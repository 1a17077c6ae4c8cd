"""What to profile: existing processes by pid, or a command bpfprof starts.

A started command waits on a pipe before exec until its pid is a BPF target,
so neither its first instructions nor its first children escape the profile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

import psutil

from symbolizer.errors import TargetError


def validate_pids(pids: Sequence[int]) -> list[int]:
    """Return the pids if every one names a live process; TargetError otherwise."""
    out = []
    for pid in pids:
        if pid <= 0 or not psutil.pid_exists(pid):
            raise TargetError(f"no process with pid {pid}")
        out.append(pid)
    return out


class GatedCommand:
    """A child process held before exec until release() is called."""

    def __init__(self, argv: Sequence[str]) -> None:
        if not argv:
            raise TargetError("no command given after --")
        exe = argv[0]
        if shutil.which(exe) is None and not os.path.exists(exe):
            raise TargetError(f"command not found: {exe}")
        read_fd, self._write_fd = os.pipe()
        # Popen returns only once the child has exec'd, so the gate cannot be
        # a preexec_fn: a shell waits on the pipe, then execs the command in
        # place (same pid), with the pipe closed.
        gate = f'read -r _ <&{read_fd}; exec {read_fd}<&-; exec "$@"'
        try:
            self.process = subprocess.Popen(["/bin/sh", "-c", gate, "bpfprof-gate", *argv], pass_fds=(read_fd,))
        except OSError as e:
            os.close(self._write_fd)
            raise TargetError(f"cannot start {exe}: {e.strerror}") from e
        finally:
            os.close(read_fd)
        self.pid = self.process.pid

    def release(self) -> None:
        """Let the command exec and run."""
        if self._write_fd >= 0:
            os.write(self._write_fd, b"x")
            os.close(self._write_fd)
            self._write_fd = -1

    def kill(self) -> None:
        """Stop an unreleased or running command (used when set-up fails)."""
        self.release()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
