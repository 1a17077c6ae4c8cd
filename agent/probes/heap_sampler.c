/* bpfprof's in-process heap sampler (LD_PRELOAD), built by agent/probes/heap_sampler.py.
 *
 * Why: a uprobe on malloc traps on every call (microseconds, against tens of
 * nanoseconds for the call): a malloc-heavy program slows down hundreds of
 * times. Here the sampling decision costs a thread-local subtraction, and
 * only sampled objects reach bpfprof, through two empty functions its
 * uprobes sit on: bpfprof_heap_alloc (one call per sampled object, ~1 per
 * 512 KiB allocated) and bpfprof_heap_free (only for sampled objects). This
 * is how Go's runtime and tcmalloc sample; bpfprof reads the stacks.
 *
 * Sampling: Go's MemProfileRate scheme. Each thread counts bytes down from an
 * exponentially distributed interval of mean bpfprof_heap_rate (env
 * BPFPROF_HEAP_RATE, default 512 KiB); the allocation that crosses zero is
 * sampled, so an allocation of s bytes is sampled with probability
 * 1 - exp(-s/rate), which the agent divides by.
 *
 * Frees: a free must tell cheaply whether its pointer was sampled. A bitmap
 * of 2^17 bits (16 KiB: stays in L1/L2) has bit h(ptr) set while the exact
 * chained table, under a mutex, holds a pointer hashing there; a free whose
 * bit is clear (nearly all of them) goes straight on.
 *
 * The next allocator (glibc's, or jemalloc/tcmalloc linked after us) is
 * found with dlsym(RTLD_NEXT); while dlsym runs, allocations come from a
 * small static arena (dlsym may allocate).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define BUCKETS_LOG2 17
#define BUCKETS (1u << BUCKETS_LOG2)
#define ARENA_BYTES 65536

/* bpfprof reads this (through /proc/PID/mem) to scale samples. */
EXPORT volatile long bpfprof_heap_rate = 512 * 1024;

/* The probe points: each is a 5-byte NOP and a RET, written in assembly so
 * the probed instruction is that NOP. Kernels that optimize uprobes (x86,
 * 6.18+) turn a uprobe on a nop5 into a call instead of an int3 trap; on
 * others it is an ordinary uprobe. */
void bpfprof_heap_alloc(void *ptr, size_t size);
void bpfprof_heap_free(void *ptr);
#define PROBE_POINT(name)                                  \
    __asm__(".text\n"                                     \
            ".globl " #name "\n"                          \
            ".type " #name ", @function\n"                \
            ".p2align 4\n" #name ":\n"                   \
            ".cfi_startproc\n"                            \
            ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"        \
            "ret\n"                                       \
            ".cfi_endproc\n"                              \
            ".size " #name ", .-" #name "\n")
PROBE_POINT(bpfprof_heap_alloc);
PROBE_POINT(bpfprof_heap_free);

static void *(*next_malloc)(size_t);
static void (*next_free)(void *);
static void *(*next_calloc)(size_t, size_t);
static void *(*next_realloc)(void *, size_t);
static void *(*next_memalign)(size_t, size_t);
static int (*next_posix_memalign)(void **, size_t, size_t);
static void *(*next_aligned_alloc)(size_t, size_t);
static void *(*next_valloc)(size_t);
static void *(*next_pvalloc)(size_t);

static __thread long countdown __attribute__((tls_model("initial-exec")));
static __thread uint64_t rng __attribute__((tls_model("initial-exec")));
static __thread int resolving __attribute__((tls_model("initial-exec")));

static char arena[ARENA_BYTES] __attribute__((aligned(16)));
static size_t arena_used;

static uint8_t occupied[BUCKETS / 8];  /* bit b: chains[b] is not empty */
struct entry {
    void *ptr;
    struct entry *next;
};
static struct entry *chains[BUCKETS];
static pthread_mutex_t chains_lock = PTHREAD_MUTEX_INITIALIZER;

static int from_arena(void *p)
{
    return (char *)p >= arena && (char *)p < arena + sizeof(arena);
}

static void *arena_alloc(size_t size)
{
    size_t at = __atomic_fetch_add(&arena_used, (size + 15) & ~(size_t)15, __ATOMIC_RELAXED);
    if (at + size > sizeof(arena))
        return NULL;
    return arena + at;
}

static void resolve(void)
{
    resolving = 1;
    next_malloc = dlsym(RTLD_NEXT, "malloc");
    next_free = dlsym(RTLD_NEXT, "free");
    next_calloc = dlsym(RTLD_NEXT, "calloc");
    next_realloc = dlsym(RTLD_NEXT, "realloc");
    next_memalign = dlsym(RTLD_NEXT, "memalign");
    next_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    next_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
    next_valloc = dlsym(RTLD_NEXT, "valloc");
    next_pvalloc = dlsym(RTLD_NEXT, "pvalloc");
    resolving = 0;
}

/* A fork while another thread holds the lock would leave the child's copy held forever. */
static void before_fork(void)
{
    pthread_mutex_lock(&chains_lock);
}

static void after_fork(void)
{
    pthread_mutex_unlock(&chains_lock);
}

__attribute__((constructor)) static void init(void)
{
    pthread_atfork(before_fork, after_fork, after_fork);
    const char *env = getenv("BPFPROF_HEAP_RATE");
    if (env) {
        long r = strtol(env, NULL, 10);
        if (r > 0)
            bpfprof_heap_rate = r;
    }
    if (!next_malloc)
        resolve();
}

static uint32_t bucket_of(void *p)
{
    return (uint32_t)(((uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ull >> (64 - BUCKETS_LOG2));
}

/* Bytes to the next sample: exponential with mean bpfprof_heap_rate. */
static long next_interval(void)
{
    if (!rng)
        rng = ((uint64_t)(uintptr_t)&rng * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)getpid() << 32) ^ 0x2545F4914F6CDD1Dull;
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    double u = ((rng >> 11) + 1) * (1.0 / 9007199254740993.0);  /* (0, 1] */
    return (long)(-log(u) * (double)bpfprof_heap_rate) + 1;
}

static __attribute__((noinline, cold)) void track(void *p, size_t size)
{
    struct entry *e = next_malloc(sizeof(*e));
    if (!e)
        return;
    uint32_t b = bucket_of(p);
    e->ptr = p;
    pthread_mutex_lock(&chains_lock);
    e->next = chains[b];
    chains[b] = e;
    __atomic_fetch_or(&occupied[b / 8], (uint8_t)(1u << (b % 8)), __ATOMIC_RELEASE);
    pthread_mutex_unlock(&chains_lock);
    bpfprof_heap_alloc(p, size);
}

/* The exact check, for the few frees whose bit is set: out of line, so the
 * fast path in free() needs no registers saved. */
static __attribute__((noinline, cold)) void untrack_slow(void *p, uint32_t b)
{
    struct entry *found = NULL;
    pthread_mutex_lock(&chains_lock);
    for (struct entry **e = &chains[b]; *e; e = &(*e)->next) {
        if ((*e)->ptr == p) {
            found = *e;
            *e = found->next;
            if (!chains[b])
                __atomic_fetch_and(&occupied[b / 8], (uint8_t)~(1u << (b % 8)), __ATOMIC_RELEASE);
            break;
        }
    }
    pthread_mutex_unlock(&chains_lock);
    if (found) {
        next_free(found);
        bpfprof_heap_free(p);
    }
}

/* If `p` was a sampled object, it is forgotten and reported. */
static inline void untrack(void *p)
{
    uint32_t b = bucket_of(p);
    if (__builtin_expect(__atomic_load_n(&occupied[b / 8], __ATOMIC_ACQUIRE) & (1u << (b % 8)), 0))
        untrack_slow(p, b);
}

/* After an allocation of `size` bytes returned `p`: sample it if its bytes cross the countdown. */
static __attribute__((noinline, cold)) void *sample(void *p, size_t size)
{
    if (!p)
        return p;
    if (countdown == -(long)size)  /* a thread's first allocation: start its countdown */
        countdown = next_interval() - (long)size;
    if (countdown > 0)
        return p;
    countdown = next_interval();
    track(p, size);
    return p;
}

static inline void *account(void *p, size_t size)
{
    if (__builtin_expect((countdown -= (long)size) > 0, 1))
        return p;
    return sample(p, size);
}

/* malloc and calloc, the hot ones, count the bytes *before* the call, so an
 * allocation that is not sampled is a tail call into the next allocator: no
 * frame, no work after it returns (measured: bench/overhead.py, C heap). */
static __attribute__((noinline, cold)) void *malloc_sampled(size_t size)
{
    return sample(next_malloc(size), size);
}

static __attribute__((noinline, cold)) void *calloc_sampled(size_t n, size_t size)
{
    return sample(next_calloc(n, size), n * size);
}

static __attribute__((noinline, cold)) void *malloc_unresolved(size_t size)
{
    if (resolving)
        return arena_alloc(size);  /* dlsym itself allocating */
    resolve();
    return malloc(size);
}

EXPORT void *malloc(size_t size)
{
    if (__builtin_expect(!next_malloc, 0))
        return malloc_unresolved(size);
    if (__builtin_expect((countdown -= (long)size) > 0, 1))
        return next_malloc(size);
    return malloc_sampled(size);
}

EXPORT void free(void *p)
{
    if (!p || from_arena(p))
        return;
    untrack(p);
    next_free(p);
}

EXPORT void *calloc(size_t n, size_t size)
{
    if (__builtin_expect(!next_calloc, 0)) {
        if (resolving) {
            void *p = arena_alloc(n * size);  /* static: already zero */
            return p;
        }
        resolve();
    }
    if (__builtin_expect((countdown -= (long)(n * size)) > 0, 1))
        return next_calloc(n, size);
    return calloc_sampled(n, size);
}

EXPORT void *realloc(void *old, size_t size)
{
    if (__builtin_expect(!next_realloc, 0))
        resolve();
    if (old && from_arena(old)) {
        void *p = malloc(size);
        size_t room = (size_t)(arena + sizeof(arena) - (char *)old);  /* the old size is unknown: copy what can be */
        if (p)
            memcpy(p, old, size < room ? size : room);
        return p;
    }
    if (old)
        untrack(old);  /* the old block is gone (or is the new one: sampled anew below) */
    return account(next_realloc(old, size), size);
}

EXPORT void *memalign(size_t align, size_t size)
{
    if (__builtin_expect(!next_memalign, 0))
        resolve();
    return account(next_memalign(align, size), size);
}

EXPORT void *aligned_alloc(size_t align, size_t size)
{
    if (__builtin_expect(!next_aligned_alloc, 0))
        resolve();
    return account(next_aligned_alloc(align, size), size);
}

EXPORT int posix_memalign(void **out, size_t align, size_t size)
{
    if (__builtin_expect(!next_posix_memalign, 0))
        resolve();
    int rc = next_posix_memalign(out, align, size);
    if (rc == 0)
        account(*out, size);
    return rc;
}

EXPORT void *valloc(size_t size)
{
    if (__builtin_expect(!next_valloc, 0))
        resolve();
    return account(next_valloc(size), size);
}

EXPORT void *pvalloc(size_t size)
{
    if (__builtin_expect(!next_pvalloc, 0))
        resolve();
    return account(next_pvalloc(size), size);
}
