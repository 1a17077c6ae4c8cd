/* Lock contention: who waited for a lock, where, how long (agent/probes/lock.py).
 *
 * Sources, told apart by the top nibble of the record's aux (user addresses
 * never use it; kernel addresses have it all ones):
 *   futex    sys_enter/exit_futex (every wait op) and futex_waitv: one record
 *            per sleep, sent at the exit with the user registers saved at
 *            the syscall and a copy of the stack top (LOCK_USTACK), so the
 *            agent unwinds through libc (no frame pointers there) by its
 *            CFI. pthread mutexes and rwlocks are these sleeps too: the agent
 *            tells them apart by the pthread function in the stack. Nothing
 *            runs on an uncontended lock call (no uprobe on pthread_*lock:
 *            two traps per call made a lock-heavy program ~100x slower).
 *            A sleep is flagged LOCK_AGAIN when its thread issued no futex
 *            wake since its previous sleep ended: it cannot have released a
 *            contended lock in between, so it may be the same call sleeping
 *            again (glibc's wait loop, woken and beaten to the lock).
 *   go       uprobes on runtime.semacquire1: entry (start, keyed by process
 *            and g = R14 of Go's ABIInternal), the instruction after its
 *            call to gopark (it parked: contended), each RET instruction
 *            (send). No uretprobe: Go moves stacks. At a RET rbp is already
 *            the caller's, so the return address at [rsp] is put back as
 *            the second frame.
 *   kernel   lock:contention_begin/end (LOCK_KERNEL), kernel + user stacks
 * futex and kernel-lock records carry the waiter's CPython frames (python.bpf.h), read at the wait's
 * end, in the waiter's context (its Python frames are those of the call that waited).
 * Record: value = ns waited, aux = lock address | source << 60.
 * An exec of a target sends a header-only record with aux = LOCK_EXEC and
 * the pid in value, so the agent can put its uprobes in the new program.
 */
#include <uapi/linux/futex.h>  /* FUTEX_* op numbers, FUTEX_CMD_MASK, struct futex_waitv */
#include <uapi/linux/ptrace.h>
#include "common.bpf.h"

#define LOCK_SRC_FUTEX 0ULL
#define LOCK_SRC_GO 3ULL
#define LOCK_SRC_EXEC 0xeULL
#define LOCK_EXEC (LOCK_SRC_EXEC << 60)
#define LOCK_AGAIN (1ULL << 59)  /* futex sleeps: see above */
#define LOCK_ADDR_MASK ((1ULL << 59) - 1)

/* Indices of lock_counts. */
#define LOCK_MAP_FULL 0   /* a wait could not be noted: it is lost */
#define LOCK_COUNTERS 1

#define LOCK_EAGAIN 11

#ifndef LOCK_USTACK
#define LOCK_USTACK 0  /* 1: futex records carry the user registers and stack copy */
#endif
#ifndef LOCK_BPF_UNWIND
#define LOCK_BPF_UNWIND 0  /* 1: futex waiters' user stacks walked in BPF (bpf/unwind.bpf.h), the copy a fallback */
#endif

struct lock_wait {
    u64 t0;
    u64 addr;
};

struct lock_go_key {
    u64 g;
    u32 tgid;
    u32 pad;
};

struct lock_go_wait {
    u64 t0;
    u64 addr;
    u64 parked;
};

BPF_HASH(lock_futex_waits, u32, struct lock_wait, LOCK_MAX_THREADS);
/* tid -> 1 if it issued a futex wake since its last sleep ended */
BPF_TABLE("lru_hash", u32, u8, lock_woke, LOCK_MAX_THREADS);
BPF_HASH(lock_go_waits, struct lock_go_key, struct lock_go_wait, LOCK_MAX_GOROUTINES);
BPF_PERCPU_ARRAY(lock_counts, u64, LOCK_COUNTERS);

static __always_inline void lock_count(u32 what)
{
    u64 *c = lock_counts.lookup(&what);
    if (c)
        (*c)++;
}

/* Send `r` with the stacks of `ctx`: kernel (when `kernel`) and user, or,
 * `frameless`, the user stack of Go at a RET, where rbp is already the
 * caller's and the return address still at [rsp] (read_frameless_user_stack);
 * then its Python frames, if read (finish_record). */
static __always_inline void lock_submit(void *ctx, struct bpfprof_stack_record *r, int kernel, int frameless)
{
    if (frameless)
        read_frameless_user_stack(ctx, r);
    else
        read_stacks(ctx, r, kernel);
    submit_record(r, finish_record(r));
}

/* ---- futex ---------------------------------------------------------------- */

static __always_inline int lock_futex_enter(u64 uaddr)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    u32 tid = id;
    struct lock_wait w = {bpf_ktime_get_ns(), uaddr};
    if (lock_futex_waits.update(&tid, &w) != 0)
        lock_count(LOCK_MAP_FULL);
    return 0;
}

static __always_inline int lock_futex_exit(void *ctx, long ret)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct lock_wait *w = lock_futex_waits.lookup(&tid);
    if (!w)
        return 0;
    u64 delta = bpf_ktime_get_ns() - w->t0;
    u64 addr = w->addr;
    lock_futex_waits.delete(&tid);
    if (ret == -LOCK_EAGAIN)  /* the word had changed: it never slept */
        return 0;
    u8 *woke = lock_woke.lookup(&tid);
    u64 again = (woke && *woke) ? 0 : LOCK_AGAIN;
    u8 no = 0;
    lock_woke.update(&tid, &no);
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_LOCK, delta,
                                                (addr & LOCK_ADDR_MASK) | again | (LOCK_SRC_FUTEX << 60));
    if (!r)
        return 0;
    py_read_frames(r->h.pid, current_fsbase());
#if USTACK_BYTES > 0 && LOCK_USTACK
    struct bpfprof_ustack u = {};
    int have = user_regs_at_entry(&u);
#if LOCK_BPF_UNWIND
    if (have)  /* no kernel stack: the futex syscall, the same in every sleep */
        unwind_start(ctx, r, &u, UNWIND_PROG_TP, UNWIND_DONE_SUBMIT, UNWIND_FAMILY_LOCK);
#endif
    submit_with_ustack(ctx, r, &u, have, 0);  /* the futex syscall: the same in every sleep */
#else
    lock_submit(ctx, r, 0, 0);
#endif
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_futex)
{
    int cmd = args->op & FUTEX_CMD_MASK;  /* without FUTEX_PRIVATE_FLAG and FUTEX_CLOCK_REALTIME, as the kernel */
    if (cmd == FUTEX_WAIT || cmd == FUTEX_LOCK_PI || cmd == FUTEX_WAIT_BITSET || cmd == FUTEX_WAIT_REQUEUE_PI ||
        cmd == FUTEX_LOCK_PI2)
        return lock_futex_enter((u64)args->uaddr);
    /* a lock may have been released */
    if (cmd == FUTEX_WAKE || cmd == FUTEX_REQUEUE || cmd == FUTEX_CMP_REQUEUE || cmd == FUTEX_WAKE_OP ||
        cmd == FUTEX_UNLOCK_PI || cmd == FUTEX_WAKE_BITSET) {
        u64 id = bpf_get_current_pid_tgid();
        if (is_target(id >> 32)) {
            u32 tid = id;
            u8 yes = 1;
            lock_woke.update(&tid, &yes);
        }
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_futex)
{
    return lock_futex_exit(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_futex_waitv)
{
    u64 uaddr = 0;  /* the first futex of the vector stands for it */
    bpf_probe_read_user(&uaddr, sizeof(uaddr), (void *)args->waiters + offsetof(struct futex_waitv, uaddr));
    return lock_futex_enter(uaddr);
}

TRACEPOINT_PROBE(syscalls, sys_exit_futex_waitv)
{
    return lock_futex_exit(args, args->ret);
}

/* ---- Go ------------------------------------------------------------------- */

static __always_inline struct lock_go_key lock_go_key_of(struct pt_regs *ctx, u32 tgid)
{
    struct lock_go_key k = {ctx->r14, tgid, 0};
    return k;
}

int lock_go_sema_enter(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    struct lock_go_key k = lock_go_key_of(ctx, tgid);
    struct lock_go_wait w = {bpf_ktime_get_ns(), ctx->ax, 0};  /* addr: first argument, RAX */
    if (lock_go_waits.update(&k, &w) != 0)
        lock_count(LOCK_MAP_FULL);
    return 0;
}

int lock_go_sema_resume(struct pt_regs *ctx)
{
    struct lock_go_key k = lock_go_key_of(ctx, bpf_get_current_pid_tgid() >> 32);
    struct lock_go_wait *w = lock_go_waits.lookup(&k);
    if (w)
        w->parked = 1;
    return 0;
}

int lock_go_sema_return(struct pt_regs *ctx)
{
    struct lock_go_key k = lock_go_key_of(ctx, bpf_get_current_pid_tgid() >> 32);
    struct lock_go_wait *w = lock_go_waits.lookup(&k);
    if (!w)
        return 0;
    u64 delta = bpf_ktime_get_ns() - w->t0;
    u64 aux = (w->addr & LOCK_ADDR_MASK) | (LOCK_SRC_GO << 60);
    u64 parked = w->parked;
    lock_go_waits.delete(&k);
    if (!parked)
        return 0;
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_LOCK, delta, aux);
    if (r)
        lock_submit(ctx, r, 0, 1);
    return 0;
}

/* ---- kernel locks ---------------------------------------------------------- */

#if LOCK_KERNEL
BPF_HASH(lock_kernel_waits, u32, struct lock_wait, LOCK_MAX_THREADS);

TRACEPOINT_PROBE(lock, contention_begin)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    u32 tid = id;
    struct lock_wait w = {bpf_ktime_get_ns(), (u64)args->lock_addr};
    /* keep the outermost wait: a spinlock inside a mutex slow path is part of it */
    if (lock_kernel_waits.insert(&tid, &w) != 0 && !lock_kernel_waits.lookup(&tid))
        lock_count(LOCK_MAP_FULL);
    return 0;
}

TRACEPOINT_PROBE(lock, contention_end)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct lock_wait *w = lock_kernel_waits.lookup(&tid);
    if (!w || w->addr != (u64)args->lock_addr)
        return 0;
    u64 delta = bpf_ktime_get_ns() - w->t0;
    u64 addr = w->addr;
    lock_kernel_waits.delete(&tid);
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_LOCK, delta, addr);
    if (r) {
        py_read_frames(r->h.pid, current_fsbase());
        lock_submit(args, r, 1, 0);
    }
    return 0;
}
#endif

/* ---- exec ------------------------------------------------------------------ */

/* The notice names the process in `value` and has pid 0: the session
 * snapshots a pid's mappings at its first record, and at exec the dynamic
 * loader has not mapped libc yet, so a notice under the real pid would make
 * every later libc frame of it unresolvable. */
int lock_on_exec(void *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_LOCK, tgid, LOCK_EXEC);
    if (r) {
        r->h.pid = 0;
        r->h.tid = 0;
        submit_header_flags(r, RB_NOW);  /* its uprobes go in before it runs far */
    }
    return 0;
}
