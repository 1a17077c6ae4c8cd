/* CPU sampling: a perf event at the configured frequency on every CPU
 * (attached by agent/cpu_probe.py). Shared maps: common.bpf.h. Each sample
 * carries the thread's trace context when its process has one (Go labels,
 * OTEP 4947 thread context). */
#include <uapi/linux/bpf_perf_event.h>
#include "common.bpf.h"

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_CPU, 1, 0);
    if (r) {
        add_trace_ctx(r, ctx->regs.r14, ctx->regs.cs);
        submit_with_stacks(ctx, r);
    }
    return 0;
}
