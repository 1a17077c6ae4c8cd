/* Off-CPU time: sched:sched_switch (attached by agent/probes/offcpu.py).
 *
 * At switch-out the current task is `prev`: its kernel and user stacks are
 * read there, in its own context, into a per-thread stash (an LRU hash of
 * whole records keyed by tid). At switch-in of `next` the stash entry of
 * `next`, if any, gets the time it was off CPU and, when that reaches
 * OFFCPU_MIN_NS, is sent as it is. So only blocks that pass the threshold
 * cost ring-buffer space and agent work, and no stack id can be reused under
 * us (see bpfprof.h); the price is one stack walk per switch-out of a target
 * thread, which a switch-out record joined in the agent would pay as well.
 *
 * Record: value = ns off CPU, ktime_ns = when the thread went off CPU,
 * cpu = where it went off, aux = prev_state at switch-out (0x100 preempted,
 * 1 S, 2 D: the kernel's TASK_REPORT bits).
 *
 * Compile-time switches: OFFCPU_MIN_NS, OFFCPU_MAX_THREADS (stash capacity).
 */
#include "common.bpf.h"

/* Indices of offcpu_counts: what could not be attributed. */
#define OFFCPU_STASH_FAILED 0 /* stash update failed: that block is lost */
#define OFFCPU_SHORT 1        /* blocks under OFFCPU_MIN_NS, left out on purpose */
#define OFFCPU_COUNTERS 2

BPF_TABLE("lru_hash", u32, struct bpfprof_stack_record, offcpu_stash, OFFCPU_MAX_THREADS);
BPF_PERCPU_ARRAY(offcpu_counts, u64, OFFCPU_COUNTERS);

static __always_inline void offcpu_count(u32 what)
{
    u64 *c = offcpu_counts.lookup(&what);
    if (c)
        (*c)++;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u32 prev = args->prev_pid;
    u64 id = bpf_get_current_pid_tgid();
    if (prev != 0 && (u32)id == prev && is_target(id >> 32)) {
        struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_OFFCPU, 0, args->prev_state);
        if (r) {
            read_stacks(args, r, 1);
            if (offcpu_stash.update(&prev, r) != 0)
                offcpu_count(OFFCPU_STASH_FAILED);
        }
    }

    u32 next = args->next_pid;
    if (next == 0)
        return 0;
    struct bpfprof_stack_record *s = offcpu_stash.lookup(&next);
    /* No entry: not a target, or off CPU since before the capture (or
     * evicted from a full stash). ktime 0: already consumed. */
    if (!s || s->h.ktime_ns == 0)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 delta = now - s->h.ktime_ns;
    s->h.value = delta;
    if (delta < OFFCPU_MIN_NS) {
        s->h.ktime_ns = 0;
        offcpu_count(OFFCPU_SHORT);
        return 0;
    }
    u64 kn = s->h.kernel_frames & BPFPROF_FRAMES_MASK;
    u64 un = s->h.user_frames & BPFPROF_FRAMES_MASK;
    u64 size = sizeof(struct bpfprof_header) + (kn + un) * sizeof(u64);
    if (size <= sizeof(*s) && records.ringbuf_output(s, size, rb_flags()) != 0)
        count_drop(BPFPROF_DROP_RINGBUF_FULL);
    s->h.ktime_ns = 0;  /* consumed: a second switch-in without a switch-out is not a block */
    return 0;
}
