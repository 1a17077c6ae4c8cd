"""Names of the pause at a Go program's exit, shared by every family that reads a Go process's memory.

A command bpfprof starts is stopped at `runtime.exit` (bpf/go_exit.bpf.c,
program `go_exit_pause`) so heap buckets and goroutines can be read one last
time; the probe set continues it after every family has read it.
"""

GO_EXIT_SOURCE = "go_exit.bpf.c"  # in bpf/
GO_EXIT_PROGRAM = "go_exit_pause"
GO_EXIT_FUNCTIONS = ("runtime.exit.abi0", "runtime.exit")  # assembly (ABI0): exit_group
