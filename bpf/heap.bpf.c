/* Heap profiling: sampled allocations and the frees of sampled objects.
 *
 * Native (glibc): uprobes on malloc, calloc, realloc, aligned_alloc (==
 * memalign), posix_memalign and free; a uretprobe on the allocating ones
 * gives the address (libc is C: uretprobes are safe there). Sampling is Go's
 * MemProfileRate scheme, decided here so an unsampled call costs one map
 * lookup: a per-thread countdown of bytes, reset after each sample to an
 * exponentially distributed interval of mean heap_sample_bytes[0]. An
 * allocation of s bytes is then sampled with probability 1 - exp(-s/R)
 * (the exponential is memoryless), which is what the agent, like Go's
 * scaleHeapSample, divides by.
 *
 * Preloaded sampler (agent/probes/heap_sampler.c): the process samples itself and
 * calls bpfprof_heap_alloc/free for sampled objects only; uprobes there.
 *
 * Go: the runtime samples at its own MemProfileRate; uprobes at the entry
 * of runtime.mProf_Malloc (one call per sampled object) and of
 * runtime.freeSpecial (where the profile record of a dead sampled object is
 * released by the sweeper) see exactly Go's samples. No uretprobe on Go.
 *
 * Only sampled objects enter `heap_live`, so only their frees are sent.
 * Names carry the heap_ prefix: all families are one translation unit.
 */
#include <uapi/linux/ptrace.h>
#include "common.bpf.h"

/* The mean sampling interval in bytes, heap_sample_bytes[0]: written by the agent after the load
 * (not compiled in: one compiled entry serves every rate); 512 KiB until then. */
#define HEAP_DEFAULT_SAMPLE_BYTES (512 * 1024)
BPF_ARRAY(heap_sample_bytes, u64, 1);
#ifndef HEAP_MAX_LIVE
#define HEAP_MAX_LIVE 262144
#endif
#define HEAP_MAX_THREADS 65536
#ifndef HEAP_USTACK
#define HEAP_USTACK 0  /* 1: ALLOC records carry the user registers and stack copy */
#endif
#define HEAP_PENDING_STALE_NS 100000000ULL /* a sampled call that never returned (longjmp, exit) */
#define HEAP_GO_SPECIAL_KIND_OFFSET 16     /* runtime.special: next *special, offset uintptr, kind byte */
#define HEAP_GO_KIND_PROFILE 4             /* runtime._KindSpecialProfile */

/* Indices of heap_stats (per CPU): what the agent reports as lost. */
#define HEAP_STAT_LIVE_FULL 0    /* sampled object not tracked: its free will be missed */
#define HEAP_STAT_NULL_RESULT 1  /* sampled allocation that failed (returned NULL) */
#define HEAP_STAT_MAX 2

struct heap_pending {
    u64 size;
    u64 sp;        /* stack pointer at entry: the matching return has sp + 8 */
    u64 memptr;    /* posix_memalign's out-parameter, else 0 */
    u64 ktime_ns;
};

struct heap_live_key {
    u32 tgid;
    u32 pad;
    u64 addr;
};

BPF_TABLE("lru_hash", u32, s64, heap_countdown, HEAP_MAX_THREADS);
BPF_HASH(heap_pending_calls, u32, struct heap_pending, HEAP_MAX_THREADS);
BPF_HASH(heap_live, struct heap_live_key, u64, HEAP_MAX_LIVE);
BPF_PERCPU_ARRAY(heap_stats, u64, HEAP_STAT_MAX);

static __always_inline void heap_count(u32 what)
{
    u64 *c = heap_stats.lookup(&what);
    if (c)
        (*c)++;
}

/* -log2(u) in Q24 for u = r / 2^26, r uniform in [1, 2^26] (as Go's
 * fastexprand); the fraction bits come from repeated squaring, exact to 2^-24. */
static __always_inline u64 heap_neg_log2_q24(u32 r)
{
    u32 k = 0, x = r;
    if (x >= (1u << 16)) { x >>= 16; k += 16; }
    if (x >= (1u << 8)) { x >>= 8; k += 8; }
    if (x >= (1u << 4)) { x >>= 4; k += 4; }
    if (x >= (1u << 2)) { x >>= 2; k += 2; }
    if (x >= (1u << 1)) { k += 1; }
    u64 m = ((u64)r << 30) >> k;  /* r / 2^k in Q30, in [1, 2) */
    u64 frac = 0;
#pragma unroll
    for (int i = 23; i >= 0; i--) {
        m = (m * m) >> 30;
        u64 bit = m >> 31;  /* m in [1, 4): bit is 1 when m >= 2 (branch-free: */
        m >>= bit;          /* 24 branches would be 2^24 paths to the verifier) */
        frac |= bit << i;
    }
    u64 log2_r = ((u64)k << 24) | frac;
    return (26ULL << 24) - log2_r;
}

/* Bytes to the next sample: exponential with mean heap_sample_bytes[0]. */
static __always_inline s64 heap_next_interval(void)
{
    u32 zero = 0;
    u64 *mean = heap_sample_bytes.lookup(&zero);
    u64 bytes = mean && *mean ? *mean : HEAP_DEFAULT_SAMPLE_BYTES;
    u32 r = (bpf_get_prandom_u32() & ((1u << 26) - 1)) + 1;
    u64 ln_q24 = (heap_neg_log2_q24(r) * 11629080ULL) >> 24;  /* x ln 2 (ln 2 in Q24) */
    return (s64)((ln_q24 * bytes) >> 24) + 1;
}

/* Whether this allocation of `size` bytes is sampled (updates the thread's countdown). */
static __always_inline int heap_sampled(u32 tid, u64 size)
{
    s64 *c = heap_countdown.lookup(&tid);
    if (!c) {
        s64 first = heap_next_interval();
        heap_countdown.update(&tid, &first);
        c = heap_countdown.lookup(&tid);
        if (!c)
            return 0;
    }
    if ((s64)size < *c) {
        *c -= size;  /* only this thread touches its slot */
        return 0;
    }
    *c = heap_next_interval();
    return 1;
}

/* Entry of a libc allocation: decide, and remember a sampled call for its return. */
static __always_inline int heap_libc_enter(struct pt_regs *ctx, u64 size, u64 memptr)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    if (!is_target(id >> 32))
        return 0;
    struct heap_pending *p = heap_pending_calls.lookup(&tid);
    if (p) {
        /* An allocator entered from inside a sampled one (realloc(NULL) jumps to
         * malloc): that call is already being recorded. */
        if (bpf_ktime_get_ns() - p->ktime_ns < HEAP_PENDING_STALE_NS)
            return 0;
        heap_pending_calls.delete(&tid);
    }
    if (!heap_sampled(tid, size))
        return 0;
    struct heap_pending np = {.size = size, .sp = PT_REGS_SP(ctx), .memptr = memptr,
                              .ktime_ns = bpf_ktime_get_ns()};
    heap_pending_calls.update(&tid, &np);
    return 0;
}

/* Send ALLOC for a sampled object and track its address. `ctx` gives the
 * stack; with HEAP_USTACK and `copy` the record also carries the user
 * registers and a stack copy, so the agent unwinds it by CFI (native code
 * without frame pointers). Go keeps frame pointers: its walk is whole
 * without a copy, and a copy costs the agent CPU the program competes for. */
static __always_inline void heap_emit_alloc(struct pt_regs *ctx, u32 tgid, u64 addr, u64 size, int copy)
{
    struct heap_live_key key = {.tgid = tgid, .addr = addr};
    u64 one = 1;
    if (heap_live.update(&key, &one) != 0)
        heap_count(HEAP_STAT_LIVE_FULL);
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_ALLOC, size, addr);
    if (!r)
        return;
#if USTACK_BYTES > 0 && HEAP_USTACK
    if (copy) {
        struct bpfprof_ustack u = {};
        int have = user_regs_at_entry(&u);
        submit_with_ustack(ctx, r, &u, have, 0);  /* a uprobe: no kernel path */
        return;
    }
#endif
    submit_with_stacks(ctx, r);
}

/* Send FREE if `addr` is a tracked sampled object of this process. */
static __always_inline void heap_emit_free(u32 tgid, u64 addr)
{
    if (!addr)
        return;
    struct heap_live_key key = {.tgid = tgid, .addr = addr};
    if (heap_live.delete(&key) != 0)
        return;  /* not sampled: nothing to send */
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_FREE, 0, addr);
    if (r)
        submit_header(r);
}

int heap_malloc_enter(struct pt_regs *ctx)
{
    return heap_libc_enter(ctx, PT_REGS_PARM1(ctx), 0);
}

int heap_calloc_enter(struct pt_regs *ctx)
{
    return heap_libc_enter(ctx, PT_REGS_PARM1(ctx) * PT_REGS_PARM2(ctx), 0);
}

int heap_aligned_alloc_enter(struct pt_regs *ctx)
{
    return heap_libc_enter(ctx, PT_REGS_PARM2(ctx), 0);
}

int heap_posix_memalign_enter(struct pt_regs *ctx)
{
    return heap_libc_enter(ctx, PT_REGS_PARM3(ctx), PT_REGS_PARM1(ctx));
}

int heap_realloc_enter(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    heap_emit_free(id >> 32, PT_REGS_PARM1(ctx));  /* the old block is gone (or is the new one) */
    return heap_libc_enter(ctx, PT_REGS_PARM2(ctx), 0);
}

int heap_free_enter(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    heap_emit_free(id >> 32, PT_REGS_PARM1(ctx));
    return 0;
}

/* uretprobe of every allocating libc function. The kernel has set ip to the
 * return address, so the frame-pointer walk starts in the caller: the
 * allocation site is the leaf (an entry probe would miss it, since libc
 * keeps no frame pointer and the caller's own return address is next). */
int heap_alloc_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct heap_pending *p = heap_pending_calls.lookup(&tid);
    if (!p)
        return 0;
    if (PT_REGS_SP(ctx) != p->sp + 8)
        return 0;  /* a nested call returning, not the sampled one */
    u64 size = p->size, memptr = p->memptr;
    heap_pending_calls.delete(&tid);
    u64 addr = 0;
    if (memptr) {
        if (PT_REGS_RC(ctx) != 0 || bpf_probe_read_user(&addr, sizeof(addr), (void *)memptr) != 0)
            addr = 0;
    } else {
        addr = PT_REGS_RC(ctx);
    }
    if (!addr) {
        heap_count(HEAP_STAT_NULL_RESULT);
        return 0;
    }
    heap_emit_alloc(ctx, id >> 32, addr, size, 1);
    return 0;
}

/* bpfprof_heap_alloc(void *ptr, size_t size) of the in-process sampler
 * (agent/probes/heap_sampler.c, preloaded): it calls this only for the objects it
 * sampled, so every hit is a sample; no uretprobe, no per-call trap. */
int heap_sampler_alloc(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    heap_emit_alloc(ctx, id >> 32, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 1);
    return 0;
}

/* bpfprof_heap_free(void *ptr): a sampled object freed. */
int heap_sampler_free(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    heap_emit_free(id >> 32, PT_REGS_PARM1(ctx));
    return 0;
}

/* runtime.mProf_Malloc(mp *m, p unsafe.Pointer, size uintptr), ABIInternal:
 * RAX, RBX, RCX. Go keeps frame pointers, so the walk from the entry is
 * whole but for the caller (runtime.profilealloc), which the agent hides
 * with the other runtime frames as runtime/pprof does. */
int heap_go_malloc(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    heap_emit_alloc(ctx, id >> 32, ctx->bx, ctx->cx, 0);
    return 0;
}

/* runtime.freeSpecial(s *special, p unsafe.Pointer, size uintptr): the
 * sweeper frees the profile record of a dead sampled object. */
int heap_go_free(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    u8 kind = 0;
    if (bpf_probe_read_user(&kind, 1, (void *)(ctx->ax + HEAP_GO_SPECIAL_KIND_OFFSET)) != 0)
        return 0;
    if (kind == HEAP_GO_KIND_PROFILE)
        heap_emit_free(id >> 32, ctx->bx);
    return 0;
}
