/* CPU sampling: a perf event at the configured frequency on every CPU
 * (attached by agent/cpu_probe.py). Shared maps: common.bpf.h. Each sample
 * carries the thread's trace context when its process has one (Go labels,
 * OTEP 4947 thread context) and, when USTACK_BYTES > 0, the user registers
 * and a copy of the user stack top for the agent's unwinder (ustack.bpf.h). */
#include "common.bpf.h"
#include "ustack.bpf.h"

#if USTACK_BYTES > 0
/* One sample as sent: the record (header, addresses, trace context), then the
 * ustack trailer and its bytes. Built per CPU: the record is copied in after
 * fill_stacks() because the trailer's place depends on the frame counts. */
struct cpu_out {
    u8 buf[sizeof(struct bpfprof_scratch) + sizeof(struct bpfprof_ustack) + USTACK_BYTES + USTACK_PAGE];
};
BPF_PERCPU_ARRAY(cpu_out_buf, struct cpu_out, 1);

static __always_inline void submit_with_ustack(struct bpf_perf_event_data *ctx, struct bpfprof_stack_record *r)
{
    u64 size = fill_stacks(ctx, r);
    if (size == 0)
        return;
    u32 zero = 0;
    struct cpu_out *out = cpu_out_buf.lookup(&zero);
    if (!out)
        return;
    if (size > sizeof(struct bpfprof_scratch))
        return;  /* for the verifier: fill_stacks already bounds it */
    struct bpfprof_ustack u = {};
    if (user_regs(ctx, &u)) {
        if (bpf_probe_read_kernel(out->buf, size, r) != 0)
            return;
        u8 *data = out->buf + size + sizeof(u);
        u.len = copy_user_stack(data, u.rsp, &u.err);
        u.kind = BPFPROF_CTX_USTACK;
        u.size = (sizeof(u) + u.len + 7) & ~7;
        __builtin_memcpy(out->buf + size, &u, sizeof(u));
        u64 total = size + u.size;
        if (total > sizeof(out->buf))
            return;
        if (records.ringbuf_output(out, total, 0) != 0)
            count_drop(BPFPROF_DROP_RINGBUF_FULL);
        return;
    }
    /* no user context (a kernel thread): the record alone */
    if (records.ringbuf_output(r, size, 0) != 0)
        count_drop(BPFPROF_DROP_RINGBUF_FULL);
}
#endif

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_CPU, 1, 0);
    if (r) {
        add_trace_ctx(r, ctx->regs.r14, ctx->regs.cs);
#if USTACK_BYTES > 0
        submit_with_ustack(ctx, r);
#else
        submit_with_stacks(ctx, r);
#endif
    }
    return 0;
}
