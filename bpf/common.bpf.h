/* Maps and helpers every probe family shares.
 *
 * All families selected for a capture are compiled as one translation unit
 * (agent/probes/probe_set.py includes each .bpf.c), so they share one ring buffer,
 * one drop counter array and one target set. The include guard makes each
 * defined once.
 *
 * Compile-time switches (-D, set by the agent):
 *   FILTER_PIDS      1: only processes in `targets` are recorded
 *   WITH_KERNEL      1: record kernel stacks too
 *   MAX_TARGETS      capacity of `targets` (and of `trace_procs`)
 *   TASK_FSBASE_OFFSET  offsetof(task_struct, thread.fsbase) from the running
 *                    kernel's BTF (agent/bpfload/btf.py), -1 if unknown: then Go labels
 *                    are read through R14 in user-mode samples only, and OTEP
 *                    4947 contexts not at all
 *
 * Trace context (bpf/tracectx.bpf.h): a family that wants its records linked
 * to the running span calls add_trace_ctx() between new_record() and
 * submit_with_stacks(); the context then travels after the addresses.
 * CPU samples and futex waits may carry a second trailer after it, the user
 * registers and stack copy of bpf/ustack.bpf.h (submit_with_ustack()).
 */
#ifndef BPFPROF_COMMON_BPF_H
#define BPFPROF_COMMON_BPF_H

#include <uapi/linux/ptrace.h>
#include "bpfprof.h"
#include "tracectx.bpf.h"
#include "ustack.bpf.h"

#ifndef TASK_FSBASE_OFFSET
#define TASK_FSBASE_OFFSET -1
#endif

/* The ring buffer's size is set when the agent creates the map (from CPU
 * count x event rate x drain interval, agent/probes/probe_set.py), not
 * compiled in: the size here is only what BCC's compile creates, and one
 * compiled set serves every size (agent/bpfload/bpf_cache.py load). */
BPF_RINGBUF_OUTPUT(records, 64);
BPF_PERCPU_ARRAY(scratch, struct bpfprof_scratch, 1);
BPF_PERCPU_ARRAY(drops, u64, BPFPROF_DROP_MAX);
BPF_HASH(targets, u32, u8, MAX_TARGETS);
/* pid -> how to read its trace context; written by the agent at first sight
 * of a process (agent/tracectx/registry.py). Not preallocated: few processes have one. */
BPF_F_TABLE("hash", u32, struct bpfprof_proc_ctx, trace_procs, MAX_TARGETS, BPF_F_NO_PREALLOC);
/* The agent's own pid (host namespace), never recorded: written by the agent
 * after the load, not compiled in, so that one compiled set serves every
 * start (agent/bpfload/bpf_cache.py). */
BPF_ARRAY(agent_tgid, u32, 1);
/* The current record's trace context, until submit_with_stacks() appends it. */
BPF_PERCPU_ARRAY(trace_ctx_scratch, struct bpfprof_trace_ctx, 1);

static __always_inline void count_drop(u32 reason)
{
    u64 *c = drops.lookup(&reason);
    if (c)
        (*c)++;  /* per-CPU slot: no atomics needed */
}

/* The current record's CPython frames (python.bpf.h), until finish_record appends them. */
BPF_PERCPU_ARRAY(py_scratch, struct bpfprof_py_frames, 1);

/* Forget the previous record's frames (new_record calls it). */
static __always_inline void py_reset(void)
{
    u32 zero = 0;
    struct bpfprof_py_frames *p = py_scratch.lookup(&zero);
    if (p)
        p->kind = BPFPROF_CTX_NONE;
}


/* Ring-buffer wake-ups. A wake-up per record would cost the recorded task an
 * IPI and the agent a context switch per record (on a VM, ~50-90 us of CPU
 * per wake-up of an idle thread): what a burst of heap samples or futex
 * sleeps paid. So a CPU wakes the agent once per rb_wake_bytes[0] bytes it sent
 * (the agent writes it after the load, so that all CPUs together fill at most
 * a quarter of the ring in between, whatever the records' sizes; 0 until
 * then: every record wakes it), and at once for a record
 * that needs an answer (RB_NOW: a process paused for the agent, an exec to
 * attach to, a stack the BPF walker had no table for). Otherwise the agent
 * drains the ring on its own clock. */
#define RB_NO_WAKEUP 1
#define RB_FORCE_WAKEUP 2
#define RB_NOW RB_FORCE_WAKEUP
BPF_ARRAY(rb_wake_bytes, u32, 1);
BPF_PERCPU_ARRAY(rb_unwoken, u32, 1);

/* The wake-up flag for a record of `size` bytes. */
static __always_inline u64 rb_flags(u64 size)
{
    u32 zero = 0;
    u32 *n = rb_unwoken.lookup(&zero);
    u32 *every = rb_wake_bytes.lookup(&zero);
    if (!n || !every)
        return RB_FORCE_WAKEUP;
    *n += size;
    if (*n >= *every) {
        *n = 0;
        return RB_FORCE_WAKEUP;
    }
    return RB_NO_WAKEUP;
}

/* Whether this process is recorded at all (the idle task never is). */
static __always_inline int is_target(u32 tgid)
{
    u32 zero = 0;
    u32 *agent = agent_tgid.lookup(&zero);
    if (tgid == 0 || (agent && tgid == *agent))
        return 0;  /* the idle task; the agent itself (its own overhead is in its metrics) */
#if FILTER_PIDS
    if (!targets.lookup(&tgid))
        return 0;
#endif
    return 1;
}

/* The per-CPU scratch record with its header filled for the current task. */
static __always_inline struct bpfprof_stack_record *new_record(u32 kind, u64 value, u64 aux)
{
    u32 zero = 0;
    struct bpfprof_scratch *s = scratch.lookup(&zero);
    if (!s)
        return 0;
    struct bpfprof_stack_record *r = &s->r;
    u64 id = bpf_get_current_pid_tgid();
    r->h.kind = kind;
    r->h.pid = id >> 32;
    r->h.tid = (u32)id;
    r->h.cpu = bpf_get_smp_processor_id();
    r->h.ktime_ns = bpf_ktime_get_ns();
    r->h.value = value;
    r->h.aux = aux;
    r->h.kernel_frames = 0;
    r->h.user_frames = 0;
    r->h.kernel_err = 0;
    r->h.user_err = 0;
    bpf_get_current_comm(&r->h.comm, sizeof(r->h.comm));
    struct bpfprof_trace_ctx *t = trace_ctx_scratch.lookup(&zero);
    if (t)
        t->kind = BPFPROF_CTX_NONE;
    py_reset();
    return r;
}

/* The current thread's user FS base (its TLS pointer), 0 if unknown. */
static __always_inline u64 current_fsbase(void)
{
#if TASK_FSBASE_OFFSET >= 0
    u64 task = bpf_get_current_task();
    u64 fs = 0;
    bpf_probe_read_kernel(&fs, sizeof(fs), (void *)(task + TASK_FSBASE_OFFSET));
    return fs;
#else
    return 0;
#endif
}

/* Read the trace context of the current thread into the per-CPU trailer, if
 * its process has one. `user_r14`/`user_cs` are the sampled registers (0 when
 * the program has none): R14 is Go's g in a user-mode sample of Go code, used
 * only when the FS base is unknown. */
static __always_inline void add_trace_ctx(struct bpfprof_stack_record *r, u64 user_r14, u64 user_cs)
{
    u32 tgid = r->h.pid, zero = 0;
    struct bpfprof_proc_ctx *pc = trace_procs.lookup(&tgid);
    if (!pc)
        return;
    struct bpfprof_trace_ctx *t = trace_ctx_scratch.lookup(&zero);
    if (!t)
        return;
    u64 fs = current_fsbase();
    int rc = 0;
    if (pc->flags & BPFPROF_PROC_OTEL)
        rc = read_otel_ctx(pc, fs, t);
    if (rc == 0 && (pc->flags & BPFPROF_PROC_GO)) {
        u64 g_hint = (fs == 0 && (user_cs & 3) == 3) ? user_r14 : 0;
        rc = read_go_labels(pc, fs, g_hint, t);
        if (rc > 0 && (t->go.count < t->go.total || t->go.cut))
            count_drop(BPFPROF_DROP_LABELS_TRUNCATED);
    }
    if (rc < 0) {
        t->kind = BPFPROF_CTX_NONE;
        count_drop(BPFPROF_DROP_TRACE_CTX_READ_ERR);
    }
}

/* The current task's kernel stack into r->ips[0..]: the frame count, with
 * read errors and truncation counted. Shared by every probe family. */
static __always_inline long read_kernel_stack(void *ctx, struct bpfprof_stack_record *r)
{
    long kn = bpf_get_stack(ctx, r->ips, BPFPROF_MAX_FRAMES * sizeof(u64), 0);
    if (kn < 0) {
        r->h.kernel_err = kn;
        count_drop(BPFPROF_DROP_KERNEL_STACK_ERR);
        kn = 0;
    }
    kn /= sizeof(u64);
    if (kn >= BPFPROF_MAX_FRAMES) {
        kn = BPFPROF_MAX_FRAMES;
        count_drop(BPFPROF_DROP_KERNEL_TRUNCATED);
    }
    return kn & BPFPROF_FRAMES_MASK;  /* bound for the verifier */
}

/* The current task's user stack into r->ips[kn..]: the frame count, also set
 * in the header, with read errors and truncation counted. `ret` != 0: the
 * stack is read where the function has no frame of its own (at its entry,
 * before the prologue; at a RET, after the epilogue): rbp is the caller's, so
 * the frame-pointer walk starts at the caller's caller, and `ret` (the
 * caller's return address, at [rsp]) is put back as the second frame. */
static __always_inline u64 read_user_stack(void *ctx, struct bpfprof_stack_record *r, u64 kn, u64 ret)
{
    kn &= BPFPROF_FRAMES_MASK;
    long un;
    if (ret)
        un = bpf_get_stack(ctx, &r->ips[kn + 1], (BPFPROF_MAX_FRAMES - 1) * sizeof(u64), BPF_F_USER_STACK);
    else
        un = bpf_get_stack(ctx, &r->ips[kn], BPFPROF_MAX_FRAMES * sizeof(u64), BPF_F_USER_STACK);
    if (un < 0) {
        /* kernel threads get 0 frames, not an error: this is a real loss */
        r->h.user_err = un;
        count_drop(BPFPROF_DROP_USER_STACK_ERR);
        un = 0;
    }
    un /= sizeof(u64);
    if (ret && un > 0) {
        r->ips[kn] = r->ips[kn + 1];  /* the probed instruction */
        r->ips[kn + 1] = ret;
        un += 1;
    }
    if (un >= BPFPROF_MAX_FRAMES) {
        un = BPFPROF_MAX_FRAMES;
        count_drop(BPFPROF_DROP_USER_TRUNCATED);
    }
    u64 frames = un;
    asm volatile("" : "+r"(frames));  /* keep the mask: the verifier bounds a size by it */
    frames &= BPFPROF_FRAMES_MASK;
    r->h.user_frames = frames;
    return frames;
}

/* The current task's kernel (if WITH_KERNEL and `kernel`) and user stacks
 * into `r`, frame counts in its header; read errors and truncation counted.
 * `ctx` is the program's context (perf event, tracepoint or uprobe):
 * bpf_get_stack takes the registers from it. `kernel` 0: the kernel path is
 * the same in every record of the family (a futex syscall, a uprobe trap)
 * and not worth reading. Returns kernel + user frames. */
static __always_inline u64 read_stacks(void *ctx, struct bpfprof_stack_record *r, int kernel)
{
    long kn = 0;
#if WITH_KERNEL
    if (kernel)
        kn = read_kernel_stack(ctx, r);
#endif
    kn &= BPFPROF_FRAMES_MASK;
    r->h.kernel_frames = kn;
    return kn + read_user_stack(ctx, r, kn, 0);
}

/* The user stack of a function without a frame yet, or no more (Go
 * assembly, a Go function before its prologue or at a RET), into r->ips, no
 * kernel stack (read_user_stack with the return address at [rsp]). Returns
 * the frame count, also set in the header. */
static __always_inline u64 read_frameless_user_stack(struct pt_regs *ctx, struct bpfprof_stack_record *r)
{
    u64 ret = 0;
    bpf_probe_read_user(&ret, sizeof(ret), (void *)PT_REGS_SP(ctx));
    return read_user_stack(ctx, r, 0, ret);
}

/* The record's size with its trace context appended after its addresses,
 * if it has one (0: too big to send). */
static __always_inline u64 finish_record(struct bpfprof_stack_record *r)
{
    u64 kn = r->h.kernel_frames & BPFPROF_FRAMES_MASK, un = r->h.user_frames & (BPFPROF_IPS - 1);
    u64 size = sizeof(struct bpfprof_header) + (kn + un) * sizeof(u64);
    u32 zero = 0;
    struct bpfprof_trace_ctx *t = trace_ctx_scratch.lookup(&zero);
    if (t && t->kind != BPFPROF_CTX_NONE) {
        /* r lives in a bpfprof_scratch: room for the whole trailer after a full stack */
        u32 ts = t->size;
        if (ts > sizeof(*t))
            ts = sizeof(*t);
        if (kn + un <= BPFPROF_IPS &&
            bpf_probe_read_kernel(&r->ips[(kn + un) & (BPFPROF_IPS - 1)], sizeof(*t), t) == 0)
            size += ts;
        t->kind = BPFPROF_CTX_NONE;  /* consumed: never appended to another record */
    }
    struct bpfprof_py_frames *p = py_scratch.lookup(&zero);
    if (p && p->kind == BPFPROF_CTX_PYTHON) {
        /* after a full stack and a full trace context there is still py_room */
        u32 ps = p->size;
        if (ps > sizeof(*p))
            ps = sizeof(*p);
        u64 at = size;
        asm volatile("" : "+r"(at));
        if (at <= sizeof(struct bpfprof_scratch) - sizeof(*p) &&
            bpf_probe_read_kernel((u8 *)r + at, sizeof(*p), p) == 0)
            size = at + ps;
        p->kind = BPFPROF_CTX_NONE;
    }
    if (size > sizeof(struct bpfprof_scratch))
        return 0;
    return size;
}

/* read_stacks, then append the trace context, if any; returns the record's
 * size (0: too big to send). */
static __always_inline u64 fill_stacks(void *ctx, struct bpfprof_stack_record *r, int kernel)
{
    read_stacks(ctx, r, kernel);
    return finish_record(r);
}

/* Send a finished record of `size` bytes; `flags`: rb_flags(size), or RB_NOW. */
static __always_inline void submit_record_flags(void *r, u64 size, u64 flags)
{
    if (size == 0)
        return;
    if (records.ringbuf_output(r, size, flags) != 0)
        count_drop(BPFPROF_DROP_RINGBUF_FULL);
}

static __always_inline void submit_record(void *r, u64 size)
{
    submit_record_flags(r, size, rb_flags(size));
}

/* fill_stacks, then send header + addresses (+ trace context). */
static __always_inline void submit_with_stacks(void *ctx, struct bpfprof_stack_record *r)
{
    submit_record(r, fill_stacks(ctx, r, 1));
}

#if USTACK_BYTES > 0
/* One record as sent with a stack copy: the record (header, addresses, trace
 * context), then the ustack trailer and its bytes. Built per CPU: the record
 * is copied in after its stacks because the trailer's place depends on the
 * frame counts. */
struct ustack_out {
    u8 buf[sizeof(struct bpfprof_scratch) + sizeof(struct bpfprof_ustack) + USTACK_BYTES + USTACK_PAGE];
};
BPF_PERCPU_ARRAY(ustack_out_buf, struct ustack_out, 1);

/* Send the finished record `r` of `size` bytes, followed by the user stack
 * from `u`'s registers up (`flags`: as submit_record_flags). 0 if it could
 * not be built. */
static __always_inline int submit_copy_flags(struct bpfprof_stack_record *r, u64 size, struct bpfprof_ustack *u,
                                             u64 flags)
{
    u32 zero = 0;
    struct ustack_out *out = ustack_out_buf.lookup(&zero);
    if (!out || size == 0)
        return 0;
    if (size > sizeof(struct bpfprof_scratch))
        return 0;  /* for the verifier: finish_record already bounds it */
    if (bpf_probe_read_kernel(out->buf, size, r) != 0)
        return 0;
    u8 *data = out->buf + size + sizeof(*u);
    u->len = copy_user_stack(data, u->rsp, &u->err);
    u->kind = BPFPROF_CTX_USTACK;
    u->size = (sizeof(*u) + u->len + 7) & ~7;
    __builtin_memcpy(out->buf + size, u, sizeof(*u));
    u64 total = size + u->size;
    if (total > sizeof(out->buf))
        return 0;
    submit_record_flags(out, total, flags);
    return 1;
}

static __always_inline int submit_copy(struct bpfprof_stack_record *r, u64 size, struct bpfprof_ustack *u)
{
    return submit_copy_flags(r, size, u, rb_flags(size + sizeof(*u) + USTACK_BYTES));
}

/* fill_stacks, then send the record with the user stack from `u`'s registers
 * (`have_regs` 0: no user context, the record alone); `kernel` as read_stacks. */
static __always_inline void submit_with_ustack(void *ctx, struct bpfprof_stack_record *r, struct bpfprof_ustack *u,
                                               int have_regs, int kernel)
{
    u64 size = fill_stacks(ctx, r, kernel);
    if (!have_regs || !submit_copy(r, size, u))
        submit_record(r, size);
}
#endif

/* Send only the header (events without a stack, such as frees); 0 if sent.
 * `flags`: rb_flags(size), or RB_NOW for a record the agent must act on at once. */
static __always_inline int submit_header_flags(struct bpfprof_stack_record *r, u64 flags)
{
    if (records.ringbuf_output(r, sizeof(struct bpfprof_header), flags) != 0) {
        count_drop(BPFPROF_DROP_RINGBUF_FULL);
        return -1;
    }
    return 0;
}

static __always_inline int submit_header(struct bpfprof_stack_record *r)
{
    return submit_header_flags(r, rb_flags(sizeof(struct bpfprof_header)));
}

#endif /* BPFPROF_COMMON_BPF_H */
