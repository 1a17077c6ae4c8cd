/* The pause at runtime.exit of a Go program bpfprof started (program
 * go_exit_pause; the agent's names for it in agent/go/exit_pause.py).
 *
 * Families that read the program's own state from its memory (heap: the
 * runtime's profile buckets; goroutine: its goroutines) name this source in
 * their extra_sources: exit_group takes that state with the address space.
 * runtime.exit is ABI0 assembly that calls exit_group. Stop the process
 * (SIGSTOP is taken on the return from this trap, before the syscall) and
 * tell the agent: its probe set lets every family read, then continues it
 * (agent/probes/probe_set.py). No record, no stop: nobody would continue a
 * process the agent was not told about.
 */
#include "common.bpf.h"

/* tgid -> 1 once paused: each family that wants the pause attaches it, so the
 * same trap may run it twice, and the process is paused once. */
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
    u64 frames = read_frameless_user_stack(ctx, r);
    if (records.ringbuf_output(r, sizeof(struct bpfprof_header) + frames * sizeof(u64), RB_NOW) != 0) {
        count_drop(BPFPROF_DROP_RINGBUF_FULL);
        return 0;
    }
    bpf_send_signal(19);  /* SIGSTOP, to the whole thread group */
    return 0;
}
