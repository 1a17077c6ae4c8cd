/* CPU sampling: a perf event at the configured frequency on every CPU.
 *
 * Compile-time switches (set by agent/cpu_sampler.py through -D):
 *   RINGBUF_PAGES    ring buffer size in pages (power of two), sized by the agent
 *                    from CPU count x frequency x drain interval
 *   FILTER_PIDS      1: only processes in `targets` are sampled
 *   FOLLOW_CHILDREN  1: processes forked by a target become targets
 *   WITH_KERNEL      1: also record the kernel stack
 *   MAX_TARGETS      capacity of `targets`
 */
#include <uapi/linux/bpf_perf_event.h>
#include "bpfprof.h"

BPF_RINGBUF_OUTPUT(records, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(scratch, struct bpfprof_stack_record, 1);
BPF_PERCPU_ARRAY(drops, u64, BPFPROF_DROP_MAX);
BPF_HASH(targets, u32, u8, MAX_TARGETS);

static __always_inline void count_drop(u32 reason)
{
    u64 *c = drops.lookup(&reason);
    if (c)
        (*c)++;  /* per-CPU slot: no atomics needed */
}

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (tgid == 0)
        return 0;  /* the idle task: not a process anyone profiles */
#if FILTER_PIDS
    if (!targets.lookup(&tgid))
        return 0;
#endif
    u32 zero = 0;
    struct bpfprof_stack_record *r = scratch.lookup(&zero);
    if (!r)
        return 0;

    r->h.kind = BPFPROF_KIND_CPU;
    r->h.pid = tgid;
    r->h.tid = (u32)id;
    r->h.cpu = bpf_get_smp_processor_id();
    r->h.ktime_ns = bpf_ktime_get_ns();
    r->h.value = 1;
    r->h.kernel_err = 0;
    r->h.user_err = 0;
    bpf_get_current_comm(&r->h.comm, sizeof(r->h.comm));

    long kn = 0;
#if WITH_KERNEL
    kn = bpf_get_stack(ctx, r->ips, BPFPROF_MAX_FRAMES * sizeof(u64), 0);
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
#endif
    kn &= 127;  /* bound for the verifier; BPFPROF_MAX_FRAMES == 127 */

    long un = bpf_get_stack(ctx, &r->ips[kn], BPFPROF_MAX_FRAMES * sizeof(u64), BPF_F_USER_STACK);
    if (un < 0) {
        /* kernel threads get 0 frames, not an error: this is a real loss */
        r->h.user_err = un;
        count_drop(BPFPROF_DROP_USER_STACK_ERR);
        un = 0;
    }
    un /= sizeof(u64);
    if (un >= BPFPROF_MAX_FRAMES) {
        un = BPFPROF_MAX_FRAMES;
        count_drop(BPFPROF_DROP_USER_TRUNCATED);
    }
    un &= 127;
    r->h.kernel_frames = kn;
    r->h.user_frames = un;

    u64 size = sizeof(struct bpfprof_header) + (kn + un) * sizeof(u64);
    if (size > sizeof(*r))
        return 0;
    if (records.ringbuf_output(r, size, 0) != 0)
        count_drop(BPFPROF_DROP_RINGBUF_FULL);
    return 0;
}

#if FOLLOW_CHILDREN
/* A process forked by a target is a target: `bpfprof record -- CMD` follows
 * the command's children. Threads land here too (their tid is added), which
 * is harmless: a thread's tgid is its creator's, already a target. */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!targets.lookup(&parent))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    targets.update(&child, &one);
    return 0;
}
#endif
