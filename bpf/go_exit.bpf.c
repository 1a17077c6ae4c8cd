/* The pause at a Go program's exit, shared by the heap and goroutine families
 * (agent/go/exit_pause.py names it). */
#include "common.bpf.h"

/* runtime.exit (ABI0 assembly: exit_group) of a Go program bpfprof started,
 * for families that read the program's own state from its memory (heap:
 * the runtime's profile buckets; goroutine: its goroutines), which
 * exit_group takes with the address space. Stop the process (SIGSTOP is
 * taken on the return from this trap, before the syscall) and tell the
 * agent: its probe set lets every family read, then continues it
 * (agent/probes/probe_set.py). Each family that wants it attaches it (and names
 * this file in its extra_sources: it is compiled once per set), so the same
 * trap may run it twice: once per process. No record, no stop: nobody would
 * continue a process the agent was not told about. */
BPF_TABLE("lru_hash", u32, u8, go_exit_paused, MAX_TARGETS);

int go_exit_pause(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    u8 one = 1;
    if (go_exit_paused.lookup(&tgid))
        return 0;
    go_exit_paused.update(&tgid, &one);
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_GO_EXIT, 0, 0);
    if (!r)
        return 0;
    /* Where the exiting goroutine is (its g.sched is stale while it runs) and
     * which g it is: Go without cgo keeps g at FS base - 8 (else aux is a
     * value no g has). runtime.exit is frameless assembly. */
    u64 fs = current_fsbase(), g = 0;
    if (fs)
        bpf_probe_read_user(&g, sizeof(g), (void *)(fs - 8));
    r->h.aux = g;
    u64 frames = read_user_stack_at_entry(ctx, r);
    if (records.ringbuf_output(r, sizeof(struct bpfprof_header) + frames * sizeof(u64), RB_NOW) != 0) {
        count_drop(BPFPROF_DROP_RINGBUF_FULL);
        return 0;
    }
    bpf_send_signal(19);  /* SIGSTOP, to the whole thread group */
    return 0;
}
