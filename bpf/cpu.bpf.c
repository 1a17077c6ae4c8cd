/* CPU sampling: a perf event at the configured frequency on every CPU
 * (attached by agent/probes/cpu.py). Shared maps: common.bpf.h. Each sample
 * carries the thread's trace context when its process has one (Go labels,
 * OTEP 4947 thread context) and, when USTACK_BYTES > 0, the user registers
 * and a copy of the user stack top for the agent's unwinder (ustack.bpf.h). */
#include "common.bpf.h"

#ifndef CPU_USTACK
#define CPU_USTACK 0  /* 1: user stacks walked from registers (record --unwind cfi) */
#endif
#ifndef CPU_BPF_UNWIND
#define CPU_BPF_UNWIND 0  /* 1: walked in BPF (bpf/unwind.bpf.h); else the stack copy goes to the agent */
#endif

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_CPU, 1, 0);
    if (r) {
        add_trace_ctx(r, ctx->regs.r14, ctx->regs.cs);
        py_read_frames(tgid, current_fsbase());
#if USTACK_BYTES > 0 && CPU_USTACK
        struct bpfprof_ustack u = {};
        int have = user_regs(ctx, &u);
#if CPU_BPF_UNWIND
        if (have) {
            unwind_start_with_kernel(ctx, r, &u, UNWIND_PROG_PERF, UNWIND_DONE_SUBMIT, UNWIND_FAMILY_CPU);
            /* not walked here: frame pointers and a copy, for the agent's walker */
            read_user_stack(ctx, r, r->h.kernel_frames, 0);
            u64 size = finish_record(r);
            /* at once: the agent registers the process as soon as it hears of it */
            if (!submit_copy_flags(r, size, &u, RB_NOW))
                submit_record_flags(r, size, RB_NOW);
            return 0;
        }
#endif
        submit_with_ustack(ctx, r, &u, have, 1);
#else
        submit_with_stacks(ctx, r);
#endif
    }
    return 0;
}
