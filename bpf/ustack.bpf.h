/* User registers and a bounded copy of the user stack top, for the agent's
 * CFI/pclntab unwinder (symbolizer/unwinder.py; why it unwinds in user space
 * and not here: agent/processes/stack_resolver.py, "Where to unwind").
 *
 * A CPU or lock record may carry, after its addresses and its trace context,
 * one struct bpfprof_ustack followed by `len` bytes of user memory from `rsp`
 * up (common.bpf.h submit_with_ustack).
 * The frame-pointer stack (bpf_get_stack) is still sent: the agent falls back
 * to it where the copy or the unwind tables fail.
 *
 * Pure functions over user memory, no maps: BCC rewrites map accesses only in
 * its main file (common.bpf.h, pasted there, owns the output buffer).
 *
 * Compile-time switch: USTACK_BYTES  bytes of stack to copy (0: none).
 */
#ifndef BPFPROF_USTACK_BPF_H
#define BPFPROF_USTACK_BPF_H

#include <uapi/linux/ptrace.h>
#include "bpfprof.h"

/* The context of a perf-event program, as uapi/linux/bpf_perf_event.h
 * defines it (x86_64: the user pt_regs, then sample_period and addr).
 * Spelled out because that header drags in enough of the kernel's headers
 * to add ~0.7 s to every compile, the largest part of bpfprof's start-up. */
#ifndef BPFPROF_PERF_EVENT_DATA
#define BPFPROF_PERF_EVENT_DATA
struct bpf_perf_event_data {
    struct pt_regs regs;
    u64 sample_period;
    u64 addr;
};
#endif

#ifndef USTACK_BYTES
#define USTACK_BYTES 0
#endif

/* Extends enum bpfprof_ctx_kind: a trailer holding registers + stack bytes. */
#define BPFPROF_CTX_USTACK 3
#define BPFPROF_USTACK_USER_MODE 1  /* the sample hit user mode: rip is the interrupted instruction */
/* A copy sent where the BPF walk (bpf/unwind.bpf.h) stopped: the record's user
 * addresses are the frames walked, the last of them is `rip`, and the agent
 * continues from these registers. */
#define BPFPROF_USTACK_CONTINUE 2
#define BPFPROF_USTACK_RIP_RETURN 4  /* rip is a return address: its rule is looked up at rip - 1 */
#define BPFPROF_USTACK_RBP_UNKNOWN 8 /* an earlier frame lost RBP: rbp is not the frame's */
#define USTACK_PAGE 4096

struct bpfprof_ustack {
    u32 kind;          /* BPFPROF_CTX_USTACK */
    u32 size;          /* bytes of this trailer: sizeof(struct bpfprof_ustack) + len, rounded up to 8 */
    u64 rip;           /* user registers at the sample (user mode) or at kernel entry (kernel mode) */
    u64 rsp;
    u64 rbp;
    u32 len;           /* bytes copied from rsp up */
    s16 err;           /* 0, or the errno of the read that ended the copy before USTACK_BYTES */
    u8 flags;          /* BPFPROF_USTACK_* */
    u8 pad;
};

#ifdef BPF_TABLE  /* BPF code (BCC defines BPF_TABLE); the structs above also compile in the layout tests */
/* The user registers saved when the current task entered the kernel (a
 * syscall, an interrupt) into `u`; 0 for a task with no user context (kernel
 * threads). bpf_task_pt_regs, not task->stack arithmetic, because the
 * top-of-stack padding differs between kernels (FRED) and headers lie here. */
static __always_inline int user_regs_at_entry(struct bpfprof_ustack *u)
{
    struct pt_regs regs;
    struct pt_regs *entry = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    if (!entry || bpf_probe_read_kernel(&regs, sizeof(regs), entry) != 0)
        return 0;
    if ((regs.cs & 3) != 3)
        return 0;  /* a kernel thread: its pt_regs hold no user context */
    u->flags = 0;
    u->rip = regs.ip;
    u->rsp = regs.sp;
    u->rbp = regs.bp;
    return 1;
}

/* The user registers of a perf-event sample into `u`: the sampled ones in
 * user mode, else those saved at kernel entry. 0 without a user context. */
static __always_inline int user_regs(struct bpf_perf_event_data *ctx, struct bpfprof_ustack *u)
{
    /* Sampled registers as scalars first: clang would otherwise merge the loads
     * of both branches into one instruction on two pointer kinds (ctx, stack),
     * which the verifier refuses. */
    u64 cs = ctx->regs.cs, ip = ctx->regs.ip, sp = ctx->regs.sp, bp = ctx->regs.bp;
    asm volatile("" : "+r"(cs), "+r"(ip), "+r"(sp), "+r"(bp));
    if ((cs & 3) == 3) {
        u->flags = BPFPROF_USTACK_USER_MODE;
        u->rip = ip;
        u->rsp = sp;
        u->rbp = bp;
        return 1;
    }
    return user_regs_at_entry(u);
}

#endif

#if USTACK_BYTES > 0
/* Copy up to USTACK_BYTES from `sp` into `dst`, one page at most per read so
 * that the copy ends at the first unreadable page (the top of the stack
 * mapping, a page not resident) and keeps what came before. Returns the bytes
 * copied; `*err` the failing read's errno, if one ended it early. `dst` must
 * have USTACK_BYTES + USTACK_PAGE bytes of room (the verifier bounds each
 * read by one page past the copied length). */
static __always_inline u32 copy_user_stack(u8 *dst, u64 sp, s16 *err)
{
    u64 copied = 0;  /* u64, not u32: a 32-bit zero-extension copies the register and the verifier loses the bound */
    for (int i = 0; i < USTACK_BYTES / USTACK_PAGE + 1; i++) {  /* a bounded loop: the verifier walks it */
        if (copied >= USTACK_BYTES)
            break;
        u64 addr = sp + copied;
        u64 chunk = USTACK_PAGE - (addr & (USTACK_PAGE - 1));
        if (chunk > USTACK_BYTES - copied)
            chunk = USTACK_BYTES - copied;
        if (chunk == 0)
            break;
        /* clang knows chunk <= one page and would drop (or fold) the check the verifier needs */
        asm volatile("" : "+r"(chunk));
        if (chunk > USTACK_PAGE)
            break;
        long rc = bpf_probe_read_user(dst + copied, chunk, (void *)addr);
        if (rc != 0) {
            *err = rc;
            break;
        }
        copied += chunk;
    }
    return copied;
}
#endif

#endif /* BPFPROF_USTACK_BPF_H */
