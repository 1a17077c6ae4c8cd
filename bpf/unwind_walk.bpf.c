/* The walker programs of bpf/unwind.bpf.h, one per program type (a tail call
 * stays within its type), and the exec/exit hooks that keep `unwind_procs`
 * true. Pasted after every family's source: a walk ends the way its family
 * sends records (unwind_done).
 */
#include "common.bpf.h"

/* The record's user frames are final: send it, or continue it with a stack
 * copy from where the walk stopped (`fallback`). */
static __always_inline void unwind_done(void *ctx, struct unwind_state *st, struct bpfprof_stack_record *r,
                                        int fallback)
{
    r->h.user_frames = st->frames & (BPFPROF_IPS - 1);
#if BPFPROF_OFFCPU_STASH
    if (st->done == UNWIND_DONE_STASH) {
        /* No room for a copy in the stash. A walk that met code outside the table at its leaf (the
         * table is older than the process's code: a snapshot taken before the dynamic loader mapped
         * libc, or before an exec) takes frame pointers, as without a table; the agent sees the leaf
         * outside its snapshot and re-reads it (ProcessTracker.note_record), which registers the
         * table again. Further up, the frames walked are kept: a stack cut short, counted. */
        if (fallback) {
            if (st->frames <= 1)
                read_user_stack(ctx, r, st->kn, 0);
            else
                unwind_count(UNWIND_FALLBACK_NO_COPY);
        }
        offcpu_stash_record(r);
        return;
    }
#endif
    u64 size = finish_record(r);
#if USTACK_BYTES > 0
    if (fallback) {
        struct bpfprof_ustack u = {};
        u.rip = st->pc;
        u.rsp = st->sp;
        u.rbp = st->bp;
        u.flags = BPFPROF_USTACK_CONTINUE | (st->is_return ? BPFPROF_USTACK_RIP_RETURN : 0) |
                  (st->bp_ok ? 0 : BPFPROF_USTACK_RBP_UNKNOWN) |
                  (st->user_mode ? BPFPROF_USTACK_USER_MODE : 0);
        if (submit_copy_flags(r, size, &u, RB_NOW))  /* at once: the agent re-reads its maps */
            return;
        unwind_count(UNWIND_FALLBACK_NO_COPY);
    }
#endif
    submit_record(r, size);
}

/* UNWIND_FRAMES_PER_CALL frames, then the next call of this same program, or the end. */
static __always_inline int unwind_walk(void *ctx, u32 prog)
{
    u32 zero = 0;
    struct unwind_state *st = unwind_state.lookup(&zero);
    struct bpfprof_scratch *s = scratch.lookup(&zero);
    if (!st || !s)
        return 0;
    struct bpfprof_stack_record *r = &s->r;
    u32 pid = r->h.pid;
    struct unwind_proc *proc = unwind_procs.lookup(&pid);
    int rc = UW_STEP_FALLBACK;
    if (proc) {
        for (int i = 0; i < UNWIND_FRAMES_PER_CALL; i++) {
            /* Each frame starts from the state in memory, not from values clang kept in
             * registers: the verifier then sees the same state at every frame and prunes. */
            asm volatile("" ::: "memory");
            rc = unwind_step(st, proc, r);
            if (rc != UW_STEP_NEXT)
                break;
        }
    } else {
        unwind_count(UNWIND_FALLBACK_NO_PROC);  /* exec'd under the walk */
    }
    if (rc == UW_STEP_NEXT) {
        if (st->calls < UNWIND_MAX_CALLS) {
            st->calls++;
            unwind_tail_call(ctx, prog);
        }
        unwind_count(UNWIND_STOP_CALLS);
        rc = UW_STEP_END;
    }
    unwind_done(ctx, st, r, rc == UW_STEP_FALLBACK);
    return 0;
}

int unwind_walk_perf(struct bpf_perf_event_data *ctx)
{
    return unwind_walk(ctx, UNWIND_PROG_PERF);
}

int unwind_walk_tp(void *ctx)
{
    return unwind_walk(ctx, UNWIND_PROG_TP);
}

int unwind_walk_kprobe(struct pt_regs *ctx)
{
    return unwind_walk(ctx, UNWIND_PROG_KPROBE);
}

/* An exec replaces every mapping: the old table would mislead the walker. The
 * agent registers the new image at its first sample (a fallback). */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    unwind_procs.delete(&tgid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (tgid == (u32)id) {
        unwind_procs.delete(&tgid);
        py_procs.delete(&tgid);
    }
    return 0;
}
