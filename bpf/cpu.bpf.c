/* CPU sampling: a perf event at the configured frequency on every CPU
 * (attached by agent/cpu_probe.py). Shared maps: common.bpf.h. */
#include <uapi/linux/bpf_perf_event.h>
#include "common.bpf.h"

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_CPU, 1, 0);
    if (r)
        submit_with_stacks(ctx, r);
    return 0;
}
