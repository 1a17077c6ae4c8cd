/* User stacks unwound in BPF, from per-file unwind rows the agent loads
 * (agent/unwind/, rows built by symbolizer/unwind_rows.py).
 *
 * Tables:
 *   unwind_rows   one array of rows for all files; a file's rows are a
 *                 contiguous run [first, first + count), sorted by pc
 *                 (vaddr - the file's base). Memory-mappable: the agent
 *                 writes a file's rows with one copy, then publishes them.
 *   unwind_procs  pid -> the process's code mappings, sorted by start: the
 *                 runtime range, the bias that turns an address into a row
 *                 pc, and its file's run of rows (count 0: a file without
 *                 CFI, walked with frame pointers). Written by the agent at
 *                 first sight of a process and when it maps new code;
 *                 deleted here at exec, where the old mappings stop being
 *                 true.
 *
 * Walk: the sampling program fills the record's kernel stack and header,
 * puts the user registers in the per-CPU `unwind_state` and tail-calls the
 * walker of its program type, which unwinds UNWIND_FRAMES_PER_CALL frames
 * and tail-calls itself until the stack ends, then sends the record (a
 * bounded loop of all 128 frames with two binary searches each is more than
 * the verifier walks in one program; bpf_loop callbacks are beyond BCC 0.26's
 * loader). The same rules as symbolizer/unwinder.py, which stays as the
 * walker of the copy path:
 *
 *   RSP/RBP/PLT/DEREF rows   CFI: CFA from the row, RA at CFA-8, RBP as saved
 *   GO rows                  pclntab SP delta: CFA = RSP + delta + 8; the
 *                            caller's BP at CFA-16 (Go's prologue)
 *   a file without rows      frame pointers: CFA = RBP + 16
 *   SIGNAL rows              the kernel's rt_sigframe: the interrupted PC is
 *                            exact; it is sent as PC + 1 so that the agent's
 *                            return-address lookup (at addr - 1) hits it
 *
 * Fallback: where the walk meets code it has no table for (the process is
 * not registered yet, the PC is in no registered mapping: a new binary in its
 * first moments, code mapped since, JIT), the record is sent with what was
 * walked plus the registers of the frame it stopped at and a copy of the
 * stack above it (bpf/ustack.bpf.h), and the agent continues the walk
 * (agent/processes/stack_resolver.py UserStacks). Counted: UNWIND_FALLBACK_*.
 *
 * Compile-time switches: UNWIND_ROWS (capacity of unwind_rows), UNWIND_PROCS
 * (capacity of unwind_procs), UNWIND_SEARCH_STEPS (>= log2(UNWIND_ROWS) + 1).
 */
#ifndef BPFPROF_UNWIND_BPF_H
#define BPFPROF_UNWIND_BPF_H

#include "bpfprof.h"

#ifndef UNWIND_ROWS
#define UNWIND_ROWS 1
#endif
#ifndef UNWIND_PROCS
#define UNWIND_PROCS 1
#endif
#ifndef UNWIND_SEARCH_STEPS
#define UNWIND_SEARCH_STEPS 24
#endif

#define UNWIND_MAX_MAPPINGS 256         /* per process; a power of two (the index mask) */
#define UNWIND_MAPPING_STEPS 9          /* log2(UNWIND_MAX_MAPPINGS) + 1 */
#define UNWIND_FRAMES_PER_CALL 8        /* ~40k instructions to verify (~75 ms of a CPU here); 16 twice that */
#define UNWIND_MAX_CALLS 16             /* 17 x 8 frames > BPFPROF_MAX_USER_FRAMES; the kernel allows 33 */
#define UNWIND_FP_ROWS 0xffffffffu      /* `first` of a mapping walked by frame pointers */

/* Row kinds: symbolizer/cfi.py CfaKind, then Go's. */
#define UW_NONE 0
#define UW_RSP 1
#define UW_RBP 2
#define UW_PLT 3
#define UW_SIGNAL 4
#define UW_OUTERMOST 5
#define UW_DEREF_RSP 6
#define UW_DEREF_RBP 7
#define UW_UNSUPPORTED 8
#define UW_GO 9
#define UW_GO_SPWRITE 10
#define UW_RBP_SAME 0
#define UW_RBP_LOST 1

/* Indices of the per-CPU `unwind_stats` array: how each walk ended, and the
 * tables' faults. agent/unwind/tables.py STATS names them. */
enum unwind_stat {
    UNWIND_COMPLETE = 0,          /* reached the outermost frame */
    UNWIND_TRUNCATED = 1,         /* deeper than BPFPROF_MAX_USER_FRAMES: cut */
    UNWIND_FALLBACK_NO_PROC = 2,  /* process not registered yet: stack copy sent */
    UNWIND_FALLBACK_UNMAPPED = 3, /* a PC in no registered mapping: stack copy sent */
    UNWIND_STOP_NO_CFI = 4,       /* no row and no usable frame pointer */
    UNWIND_STOP_BAD_CFA = 5,      /* the CFA did not move up the stack */
    UNWIND_STOP_READ = 6,         /* a read of the stack failed */
    UNWIND_STOP_RBP_UNKNOWN = 7,  /* the rule needs RBP and an earlier frame lost it */
    UNWIND_STOP_UNSUPPORTED = 8,  /* a row the walker has no rule for */
    UNWIND_STOP_GO_SPWRITE = 9,   /* a Go function that switched stacks */
    UNWIND_STOP_CALLS = 10,       /* a tail call failed: the walk sent as far as it got */
    UNWIND_FALLBACK_NO_COPY = 11, /* a fallback whose copy could not be made: sent as walked */
    UNWIND_STATS = 12,
};

struct unwind_row {
    u32 pc;
    u8 kind;
    u8 rbp;   /* an s8: rbp offset / 8, UW_RBP_SAME, UW_RBP_LOST; PLT: threshold (u8: BCC's
               * map type decoder knows no `signed char`) */
    s16 cfa;  /* cfa offset / 8 */
};

struct unwind_mapping {
    u64 start;
    u64 end;
    u64 bias;   /* row pc = address + bias (mod 2^64) */
    u32 first;  /* first row in unwind_rows; UNWIND_FP_ROWS: frame pointers */
    u32 count;
};

struct unwind_proc {
    u32 n;
    u32 pad;
    struct unwind_mapping m[UNWIND_MAX_MAPPINGS];
};

/* Where a walk goes when it ends (per family: each sends its records its own way). */
#define UNWIND_DONE_SUBMIT 0  /* send the record with its trace context */
#define UNWIND_DONE_STASH 1   /* off-CPU: stash the record until its thread runs again */

struct unwind_state {
    u64 pc;
    u64 sp;
    u64 bp;
    u64 kn;          /* kernel frames: the first user frame's index in ips[] */
    u32 frames;      /* user frames written */
    u32 calls;       /* tail calls taken */
    u8 bp_ok;        /* bp holds the frame's RBP */
    u8 is_return;    /* pc is a return address: its rule is looked up at pc - 1 */
    u8 done;         /* UNWIND_DONE_* */
    u8 user_mode;    /* the sample hit user mode */
    u8 family;       /* UNWIND_FAMILY_*: whose counters */
    u8 pad[3];
    u32 opaque;      /* unwind_opaque()'s round trip */
    u32 opaque2;
};

/* The walker program of each caller's program type, one prog array each: the
 * kernel ties a prog array to the type of the first program that uses it
 * (bpf_prog_map_compatible), so one array shared by a perf_event and a
 * tracepoint caller makes the second fail to load with EINVAL. */
#define UNWIND_PROG_PERF 0
#define UNWIND_PROG_TP 1
#define UNWIND_PROG_KPROBE 2
BPF_PROG_ARRAY(unwind_calls_perf, 1);
BPF_PROG_ARRAY(unwind_calls_tp, 1);
BPF_PROG_ARRAY(unwind_calls_kprobe, 1);

/* Tail-call the walker for `prog` (a constant once inlined: the other arms fold away). */
static __always_inline void unwind_tail_call(void *ctx, u32 prog)
{
    if (prog == UNWIND_PROG_PERF)
        unwind_calls_perf.call(ctx, 0);
    else if (prog == UNWIND_PROG_TP)
        unwind_calls_tp.call(ctx, 0);
    else
        unwind_calls_kprobe.call(ctx, 0);
}
BPF_F_TABLE("array", u32, struct unwind_row, unwind_rows, UNWIND_ROWS, BPF_F_MMAPABLE);
BPF_F_TABLE("hash", u32, struct unwind_proc, unwind_procs, UNWIND_PROCS, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(unwind_state, struct unwind_state, 1);
/* Counted per family (UNWIND_FAMILY_*): each reports its own stacks. */
#define UNWIND_FAMILY_CPU 0
#define UNWIND_FAMILY_OFFCPU 1
#define UNWIND_FAMILY_LOCK 2
#define UNWIND_FAMILIES 3
BPF_PERCPU_ARRAY(unwind_stats, u64, UNWIND_FAMILIES * UNWIND_STATS);

static __always_inline void unwind_count_for(u32 family, u32 what)
{
    u32 at = family * UNWIND_STATS + what;
    u64 *c = unwind_stats.lookup(&at);
    if (c)
        (*c)++;
}
#define unwind_count(what) unwind_count_for(st->family, (what))

static __always_inline int read_u64(u64 *out, u64 addr)
{
    return bpf_probe_read_user(out, sizeof(*out), (void *)addr);
}

/* Step results. */
#define UW_STEP_NEXT 0
#define UW_STEP_END 1       /* the stack is complete, or cut (counted) */
#define UW_STEP_FALLBACK 2  /* no table for this PC: send a copy from here */

/* `i` passed through map memory: the verifier knows nothing of a value read
 * back from a map, so the binary search's bounds do not become "precise" by
 * indexing an array (which would stop it from pruning the search's paths and
 * multiply the states it walks per frame ~50 times). */
static __always_inline u32 unwind_opaque(struct unwind_state *st, u32 i)
{
    *(volatile u32 *)&st->opaque = i;
    return *(volatile u32 *)&st->opaque;
}

/* Both bounds of a binary search made opaque at each step: the verifier then
 * sees one state per step whichever way the comparisons went. */
#define UNWIND_OPAQUE_BOUNDS(st, lo, hi)                                  \
    do {                                                                  \
        *(volatile u32 *)&(st)->opaque = (lo);                            \
        *(volatile u32 *)&(st)->opaque2 = (hi);                           \
        (lo) = *(volatile u32 *)&(st)->opaque;                            \
        (hi) = *(volatile u32 *)&(st)->opaque2;                           \
    } while (0)

/* The mapping of `pc` among the process's, or 0. */
static __always_inline struct unwind_mapping *unwind_mapping_of(struct unwind_state *st, struct unwind_proc *proc,
                                                                u64 pc)
{
    u32 n = proc->n;
    if (n > UNWIND_MAX_MAPPINGS)
        n = UNWIND_MAX_MAPPINGS;
    u32 lo = 0, hi = n;
    for (int i = 0; i < UNWIND_MAPPING_STEPS; i++) {
        UNWIND_OPAQUE_BOUNDS(st, lo, hi);
        if (lo >= hi)
            break;
        u32 mid = (lo + hi) / 2;
        if (proc->m[unwind_opaque(st, mid) & (UNWIND_MAX_MAPPINGS - 1)].start <= pc)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return 0;
    struct unwind_mapping *m = &proc->m[unwind_opaque(st, lo - 1) & (UNWIND_MAX_MAPPINGS - 1)];
    if (pc >= m->end)
        return 0;
    return m;
}

/* The row that holds at row pc `rpc` in [first, first + count), or 0 when rpc is below the first row. */
static __always_inline struct unwind_row *unwind_row_of(struct unwind_state *st, u32 first, u32 count, u32 rpc)
{
    u32 lo = first, hi = first + count;
    for (int i = 0; i < UNWIND_SEARCH_STEPS; i++) {
        UNWIND_OPAQUE_BOUNDS(st, lo, hi);
        if (lo >= hi)
            break;
        u32 mid = lo + (hi - lo) / 2;
        struct unwind_row *row = unwind_rows.lookup(&mid);
        if (!row)
            return 0;
        if (row->pc <= rpc)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == first)
        return 0;
    u32 at = lo - 1;
    return unwind_rows.lookup(&at);
}

/* Append `pc` as the next user frame; 0 when the stack is full (cut, counted). */
static __always_inline int unwind_push(struct unwind_state *st, struct bpfprof_stack_record *r, u64 pc)
{
    if (st->frames >= BPFPROF_MAX_USER_FRAMES) {
        unwind_count(UNWIND_TRUNCATED);
        count_drop(BPFPROF_DROP_USER_TRUNCATED);
        return 0;
    }
    r->ips[(st->kn + st->frames) & (BPFPROF_IPS - 1)] = pc;
    st->frames++;
    return 1;
}

/* One frame: from the state's pc/sp/bp to its caller's, the caller's PC appended. */
static __always_inline int unwind_step(struct unwind_state *st, struct unwind_proc *proc,
                                       struct bpfprof_stack_record *r)
{
    u64 pc = st->is_return ? st->pc - 1 : st->pc;
    struct unwind_mapping *m = unwind_mapping_of(st, proc, pc);
    if (!m) {
        unwind_count(UNWIND_FALLBACK_UNMAPPED);
        return UW_STEP_FALLBACK;
    }
    u8 kind = UW_NONE;
    s64 cfa_off = 0, rbp_off = 0;
    if (m->first != UNWIND_FP_ROWS) {
        u64 rpc = pc + m->bias;
        if (rpc >> 32) {
            unwind_count(UNWIND_FALLBACK_UNMAPPED);
            return UW_STEP_FALLBACK;
        }
        struct unwind_row *row = unwind_row_of(st, m->first, m->count, (u32)rpc);
        if (row) {
            kind = row->kind;
            cfa_off = (s64)row->cfa * 8;
            rbp_off = (s8)row->rbp;
        }
    }
    u64 sp = st->sp, bp = st->bp, cfa = 0, ra = 0, new_bp = bp;
    u8 bp_ok = st->bp_ok, cfi_rbp = 0;
    switch (kind) {
    case UW_RSP:
        cfa = sp + cfa_off;
        cfi_rbp = 1;
        break;
    case UW_PLT:
        cfa = sp + cfa_off + ((pc & 15) >= (u64)rbp_off ? 8 : 0);
        break;
    case UW_RBP:
        if (!bp_ok) {
            unwind_count(UNWIND_STOP_RBP_UNKNOWN);
            return UW_STEP_END;
        }
        cfa = bp + cfa_off;
        cfi_rbp = 1;
        break;
    case UW_DEREF_RSP:
    case UW_DEREF_RBP: {
        if (kind == UW_DEREF_RBP && !bp_ok) {
            unwind_count(UNWIND_STOP_RBP_UNKNOWN);
            return UW_STEP_END;
        }
        u64 reg = kind == UW_DEREF_RSP ? sp : bp;
        if (read_u64(&cfa, reg + cfa_off) != 0) {
            unwind_count(UNWIND_STOP_READ);
            return UW_STEP_END;
        }
        cfi_rbp = 1;
        break;
    }
    case UW_GO:
        cfa = sp + cfa_off;
        if (cfa_off >= 16) {
            u64 saved = 0;
            bp_ok = read_u64(&saved, cfa - 16) == 0 && saved >= cfa;
            new_bp = saved;
        }
        break;
    case UW_NONE:
        /* no row: the callee is assumed to keep frame pointers */
        if (!bp_ok || bp < sp || (bp & 7)) {
            unwind_count(UNWIND_STOP_NO_CFI);
            return UW_STEP_END;
        }
        if (read_u64(&new_bp, bp) != 0) {
            unwind_count(UNWIND_STOP_READ);
            return UW_STEP_END;
        }
        bp_ok = 1;
        cfa = bp + 16;
        break;
    case UW_SIGNAL: {
        u64 regs = sp + cfa_off, new_sp = 0, ip = 0;
        if (read_u64(&new_sp, regs) != 0 || read_u64(&ip, regs + 8) != 0 ||
            read_u64(&new_bp, sp + rbp_off * 8) != 0) {
            unwind_count(UNWIND_STOP_READ);
            return UW_STEP_END;
        }
        if (ip == 0) {
            unwind_count(UNWIND_COMPLETE);
            return UW_STEP_END;
        }
        if (!unwind_push(st, r, ip + 1))  /* exact: +1 for the agent's lookup at addr - 1 */
            return UW_STEP_END;
        st->pc = ip;
        st->sp = new_sp;
        st->bp = new_bp;
        st->bp_ok = 1;
        st->is_return = 0;
        return UW_STEP_NEXT;
    }
    case UW_OUTERMOST:
        unwind_count(UNWIND_COMPLETE);
        return UW_STEP_END;
    case UW_GO_SPWRITE:
        unwind_count(UNWIND_STOP_GO_SPWRITE);
        return UW_STEP_END;
    default:
        unwind_count(UNWIND_STOP_UNSUPPORTED);
        return UW_STEP_END;
    }
    if (cfa <= sp) {
        unwind_count(UNWIND_STOP_BAD_CFA);
        return UW_STEP_END;
    }
    if (read_u64(&ra, cfa - 8) != 0) {
        unwind_count(UNWIND_STOP_READ);
        return UW_STEP_END;
    }
    if (cfi_rbp && rbp_off != UW_RBP_SAME) {
        if (rbp_off == UW_RBP_LOST) {
            bp_ok = 0;
        } else if (read_u64(&new_bp, cfa + rbp_off * 8) != 0) {
            bp_ok = 0;
        } else {
            bp_ok = 1;
        }
    }
    if (ra == 0) {
        unwind_count(UNWIND_COMPLETE);
        return UW_STEP_END;
    }
    if (!unwind_push(st, r, ra))
        return UW_STEP_END;
    st->pc = ra;
    st->sp = cfa;
    st->bp = new_bp;
    st->bp_ok = bp_ok;
    st->is_return = 1;
    return UW_STEP_NEXT;
}

/* Walk the current task's user stack from `u`'s registers into `r` (its
 * header and kernel frames already set), by tail calls into the walker of
 * program type `prog`, which sends the record (or stashes it: `done`).
 * Returns only if the walk did not start: the process has no table yet, or
 * the tail call failed; the caller then sends the record its old way (frame
 * pointers, a stack copy). */
static __always_inline void unwind_start(void *ctx, struct bpfprof_stack_record *r, struct bpfprof_ustack *u,
                                         u32 prog, u8 done, u8 family)
{
    u32 pid = r->h.pid, zero = 0;
    if (!unwind_procs.lookup(&pid)) {
        unwind_count_for(family, UNWIND_FALLBACK_NO_PROC);
        return;
    }
    struct unwind_state *st = unwind_state.lookup(&zero);
    if (!st)
        return;
    st->family = family;
    st->pc = u->rip;
    st->sp = u->rsp;
    st->bp = u->rbp;
    st->bp_ok = 1;
    st->is_return = 0;
    st->kn = r->h.kernel_frames & BPFPROF_FRAMES_MASK;
    st->frames = 0;
    st->calls = 0;
    st->done = done;
    st->user_mode = (u->flags & BPFPROF_USTACK_USER_MODE) != 0;
    unwind_push(st, r, u->rip);
    unwind_tail_call(ctx, prog);
    unwind_count(UNWIND_STOP_CALLS);
}

/* unwind_start, after reading the kernel stack into `r` (WITH_KERNEL). */
static __always_inline void unwind_start_with_kernel(void *ctx, struct bpfprof_stack_record *r,
                                                     struct bpfprof_ustack *u, u32 prog, u8 done, u8 family)
{
    u64 kn = 0;
#if WITH_KERNEL
    kn = read_kernel_stack(ctx, r);
#endif
    r->h.kernel_frames = kn & BPFPROF_FRAMES_MASK;
    unwind_start(ctx, r, u, prog, done, family);
}

#endif /* BPFPROF_UNWIND_BPF_H */
