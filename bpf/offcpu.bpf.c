/* Off-CPU time: sched:sched_switch (attached by agent/probes/offcpu.py).
 *
 * At switch-out the current task is `prev`: its kernel and user stacks are
 * read there, in its own context, into a per-thread stash (an LRU hash of
 * whole records keyed by tid). At switch-in of `next` the stash entry of
 * `next`, if any, gets the time it was off CPU and, when that reaches
 * offcpu_min_ns[0], is sent as it is. So only blocks that pass the threshold
 * cost ring-buffer space and agent work, and no stack id can be reused under
 * us (see bpfprof.h); the price is one stack walk per switch-out of a target
 * thread, which a switch-out record joined in the agent would pay as well.
 *
 * Record: value = ns off CPU, ktime_ns = when the thread went off CPU,
 * cpu = where it went off, aux = prev_state at switch-out (0x100 preempted,
 * 1 S, 2 D: the kernel's TASK_REPORT bits).
 *
 * Compile-time switch: OFFCPU_MAX_THREADS (stash capacity). The threshold,
 * offcpu_min_ns[0], is written by the agent after the load (not compiled in:
 * one compiled entry serves every threshold).
 */
#include "common.bpf.h"

#ifndef OFFCPU_BPF_UNWIND
#define OFFCPU_BPF_UNWIND 0  /* 1: user stacks walked in BPF (bpf/unwind.bpf.h), frame pointers the fallback */
#endif

/* Indices of offcpu_counts: what could not be attributed. */
#define OFFCPU_STASH_FAILED 0 /* stash update failed: that block is lost */
#define OFFCPU_SHORT 1        /* blocks under offcpu_min_ns[0], left out on purpose */
#define OFFCPU_COUNTERS 2

BPF_TABLE("lru_hash", u32, struct bpfprof_stack_record, offcpu_stash, OFFCPU_MAX_THREADS);
BPF_PERCPU_ARRAY(offcpu_counts, u64, OFFCPU_COUNTERS);
BPF_ARRAY(offcpu_min_ns, u64, 1);

static __always_inline void offcpu_count(u32 what)
{
    u64 *c = offcpu_counts.lookup(&what);
    if (c)
        (*c)++;
}

/* The stash entry of a thread going off CPU: its stacks as of now. */
#define BPFPROF_OFFCPU_STASH 1
static __always_inline void offcpu_stash_record(struct bpfprof_stack_record *r)
{
    u32 tid = r->h.tid;
    if (offcpu_stash.update(&tid, r) != 0)
        offcpu_count(OFFCPU_STASH_FAILED);
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    /* `next` first: the switch-out below may end in a tail call (the BPF walker), which never returns. */
    u32 next = args->next_pid;
    struct bpfprof_stack_record *s = next != 0 ? offcpu_stash.lookup(&next) : 0;
    /* No entry: not a target, or off CPU since before the capture (or
     * evicted from a full stash). ktime 0: already consumed. */
    if (s && s->h.ktime_ns != 0) {
        u64 now = bpf_ktime_get_ns();
        u64 delta = now - s->h.ktime_ns;
        s->h.value = delta;
        u32 zero = 0;
        u64 *min_ns = offcpu_min_ns.lookup(&zero);
        if (min_ns && delta < *min_ns) {
            offcpu_count(OFFCPU_SHORT);
        } else {
            u64 kn = s->h.kernel_frames & BPFPROF_FRAMES_MASK;
            u64 un = s->h.user_frames & (BPFPROF_IPS - 1);
            u64 size = sizeof(struct bpfprof_header) + (kn + un) * sizeof(u64);
            if (size <= sizeof(*s) && records.ringbuf_output(s, size, rb_flags(size)) != 0)
                count_drop(BPFPROF_DROP_RINGBUF_FULL);
        }
        s->h.ktime_ns = 0;  /* consumed: a second switch-in without a switch-out is not a block */
    }

    u32 prev = args->prev_pid;
    u64 id = bpf_get_current_pid_tgid();
    if (prev == 0 || (u32)id != prev || !is_target(id >> 32))
        return 0;
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_OFFCPU, 0, args->prev_state);
    if (!r)
        return 0;
#if OFFCPU_BPF_UNWIND
    struct bpfprof_ustack u = {};
    if (user_regs_at_entry(&u)) {
        unwind_start_with_kernel(args, r, &u, UNWIND_PROG_TP, UNWIND_DONE_STASH, UNWIND_FAMILY_OFFCPU);
        /* no table yet: frame pointers (a stash holds no stack copy) */
        read_user_stack(args, r, r->h.kernel_frames, 0);
        offcpu_stash_record(r);
        return 0;
    }
#endif
    read_stacks(args, r, 1);
    offcpu_stash_record(r);
    return 0;
}
