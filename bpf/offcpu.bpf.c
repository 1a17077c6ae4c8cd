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
 * CPython frames (python.bpf.h) are read at switch-out too, in the thread's
 * own context, and kept apart from the stash: a smaller LRU keyed by tid,
 * filled only for threads of registered Python processes (~0.5 KiB an entry
 * against the stash's ~2 KiB, so the stash does not grow by a trailer most
 * threads never have). The stash entry says in its aux (OFFCPU_AUX_PY)
 * whether the py entry belongs to it: an entry left by an earlier switch-out
 * of the same tid is never sent. At switch-in a record with Python frames is
 * put together with its trailer in the per-CPU scratch (finish_record);
 * one whose entry was evicted goes without it, counted (OFFCPU_PY_LOST).
 *
 * Nothing leaves the stash uncounted: an entry is deleted when its block is
 * sent or left out (short, OFFCPU_SHORT), and each way a block can go
 * unsent has its counter: a stash update that failed, an entry bigger than a
 * record, a record the Python path could not build, a switch-in the program
 * missed (found at the next switch-out: OFFCPU_UNCONSUMED; a missed
 * switch-out the kernel counts as the program's recursion misses, read by the
 * agent). The LRU evicts entries of the longest-blocked threads when more
 * than OFFCPU_MAX_THREADS are off CPU at once; OFFCPU_STASHED and
 * OFFCPU_CONSUMED let the agent count those: stashed - consumed - entries
 * left = evicted. A thread's last switch-out (exiting) is not a block and is
 * not stashed.
 *
 * Compile-time switches: OFFCPU_MAX_THREADS (stash capacity),
 * OFFCPU_PY_THREADS (capacity of the Python frames' LRU). The threshold,
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
#define OFFCPU_PY_LOST 2      /* a block's Python frames evicted from offcpu_py (or not kept): sent without */
#define OFFCPU_TOO_BIG 3      /* a stash entry's frame counts exceed the record: not sent */
#define OFFCPU_UNSENT 4       /* the record with Python frames could not be built: not sent */
#define OFFCPU_UNCONSUMED 5   /* a switch-out found the thread's last block unsent (its switch-in missed) */
#define OFFCPU_STASHED 6      /* entries added to the stash (not a loss: for the eviction count) */
#define OFFCPU_CONSUMED 7     /* entries deleted at switch-in, sent or not (not a loss: idem) */
#define OFFCPU_NO_SCRATCH 8   /* no per-CPU scratch for a switch-out: that block is lost */
#define OFFCPU_COUNTERS 9

/* sched_switch prev_state of a thread's last switch-out (EXIT_DEAD, EXIT_ZOMBIE as TASK_REPORT bits). */
#define OFFCPU_EXITING (0x10 | 0x20)

/* In a stash entry's aux until its switch-in: offcpu_py holds its Python frames. prev_state never uses it. */
#define OFFCPU_AUX_PY (1ULL << 63)

#ifndef OFFCPU_PY_THREADS
#define OFFCPU_PY_THREADS 1
#endif

BPF_TABLE("lru_hash", u32, struct bpfprof_stack_record, offcpu_stash, OFFCPU_MAX_THREADS);
BPF_TABLE("lru_hash", u32, struct bpfprof_py_frames, offcpu_py, OFFCPU_PY_THREADS);
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
    /* Entries are deleted at switch-in: one still here is a block whose switch-in the program missed. */
    struct bpfprof_stack_record *old = offcpu_stash.lookup(&tid);
    if (old && old->h.ktime_ns != 0)
        offcpu_count(OFFCPU_UNCONSUMED);
    if (offcpu_stash.update(&tid, r) != 0)
        offcpu_count(OFFCPU_STASH_FAILED);
    else if (!old)
        offcpu_count(OFFCPU_STASHED);
}

/* Keep the Python frames py_read_frames just read for the thread going off CPU (none: nothing to keep). */
static __always_inline void offcpu_keep_py(struct bpfprof_stack_record *r)
{
    u32 zero = 0, tid = r->h.tid;
    struct bpfprof_py_frames *p = py_scratch.lookup(&zero);
    if (!p || p->kind != BPFPROF_CTX_PYTHON)
        return;
    if (offcpu_py.update(&tid, p) == 0)
        r->h.aux |= OFFCPU_AUX_PY;
    else
        offcpu_count(OFFCPU_PY_LOST);
}

/* Send stash entry `s` of thread `tid`, `size` bytes of it, with its Python frames when it has them. */
static __always_inline void offcpu_send(struct bpfprof_stack_record *s, u32 tid, u64 size)
{
    u32 zero = 0;
    if (!(s->h.aux & OFFCPU_AUX_PY)) {
        if (records.ringbuf_output(s, size, rb_flags(size)) != 0)
            count_drop(BPFPROF_DROP_RINGBUF_FULL);
        return;
    }
    s->h.aux &= ~OFFCPU_AUX_PY;
    struct bpfprof_py_frames *py = offcpu_py.lookup(&tid);
    struct bpfprof_scratch *out = scratch.lookup(&zero);
    struct bpfprof_py_frames *p = py_scratch.lookup(&zero);
    struct bpfprof_trace_ctx *t = trace_ctx_scratch.lookup(&zero);
    if (!py || !out || !p || !t || bpf_probe_read_kernel(p, sizeof(*p), py) != 0 ||
        bpf_probe_read_kernel(&out->r, size, s) != 0) {
        offcpu_count(OFFCPU_PY_LOST);
        if (records.ringbuf_output(s, size, rb_flags(size)) != 0)
            count_drop(BPFPROF_DROP_RINGBUF_FULL);
        return;
    }
    t->kind = BPFPROF_CTX_NONE;  /* off-CPU records carry no trace context */
    u64 full = finish_record(&out->r);  /* appends (and consumes) the py_scratch trailer */
    if (full == 0)
        offcpu_count(OFFCPU_UNSENT);
    submit_record(&out->r, full);
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    /* `next` first: the switch-out below may end in a tail call (the BPF walker), which never returns. */
    u32 next = args->next_pid;
    struct bpfprof_stack_record *s = next != 0 ? offcpu_stash.lookup(&next) : 0;
    /* No entry: not a target, off CPU since before the capture, a new
     * thread's first run, or evicted from a full stash (counted by the agent
     * from OFFCPU_STASHED - OFFCPU_CONSUMED). */
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
            if (size <= sizeof(*s))
                offcpu_send(s, next, size);
            else
                offcpu_count(OFFCPU_TOO_BIG);
        }
        s->h.ktime_ns = 0;  /* consumed: a second switch-in without a switch-out is not a block */
        if (offcpu_stash.delete(&next) == 0)
            offcpu_count(OFFCPU_CONSUMED);
    }

    u32 prev = args->prev_pid;
    u64 id = bpf_get_current_pid_tgid();
    if (prev == 0 || (u32)id != prev || !is_target(id >> 32))
        return 0;
    if (args->prev_state & OFFCPU_EXITING)
        return 0;  /* its last switch-out: it never runs again, so this is no block */
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_OFFCPU, 0, args->prev_state);
    if (!r) {
        offcpu_count(OFFCPU_NO_SCRATCH);
        return 0;
    }
    /* before the walk below: it may end in a tail call that stashes the record */
    py_read_frames(id >> 32, current_fsbase());
    offcpu_keep_py(r);
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
