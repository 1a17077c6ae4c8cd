/* Goroutine profile: the life of every goroutine of the target Go processes
 * (agent/probes/goroutine.py keeps the table of live goroutines from these events).
 *
 * Uprobes, never a uretprobe on Go:
 *   runtime.casgstatus(gp, oldval, newval)   RAX, RBX, RCX (ABIInternal):
 *     at its call sites in newproc1 and gdestroy when the agent reads parked
 *     goroutines from memory (the registers hold the arguments at the CALL),
 *     else at its entry, with gopark (stripped binaries: no runtime.allgs)
 *       dead -> anything   CREATE  (newproc1 has set goid, gopc, startpc, labels)
 *       anything -> dead   EXIT    (gdestroy)
 *       waiting -> other   WAKE    (ready, or a GC wait ends: the parked stack is stale)
 *     Every other transition (runnable <-> running, syscalls) sends nothing:
 *     they are the hot ones, and they do not change what is parked where.
 *   runtime.gopark    PARK: the goroutine's own stack. gopark runs on the
 *     goroutine's stack (R14 = g); park_m, which sets _Gwaiting, runs on g0.
 * Record: aux = goid; value = event << 56 | payload:
 *   CREATE  payload = g.labels; user frames = [g.startpc, g.gopc] (the entry
 *           function and the creation site, not a stack: newproc1 runs on g0)
 *   PARK    payload = g.labels; user frames = the stack, gopark first
 *   WAKE, EXIT  payload = newval
 *   EXEC    payload = the pid that exec'd; header pid 0 (as lock.bpf.c: the
 *           session must not snapshot the process before its loader ran)
 * Offsets of g's fields differ per Go version: the agent writes them per
 * process into gor_procs (from DWARF or its version table); events of a
 * process without an entry are counted and dropped.
 */
#include <uapi/linux/ptrace.h>
#include "common.bpf.h"

#define GOR_EV_CREATE 1ULL
#define GOR_EV_PARK 2ULL
#define GOR_EV_WAKE 3ULL
#define GOR_EV_EXIT 4ULL
#define GOR_EV_EXEC 5ULL
#define GOR_EV_SHIFT 56
#define GOR_PAYLOAD_MASK ((1ULL << GOR_EV_SHIFT) - 1)

/* runtime2.go _G* status values (stable since Go 1.0, _Gdeadextra since 1.22-ish, _Gleaked 1.26). */
#define GOR_G_IDLE 0
#define GOR_G_WAITING 4
#define GOR_G_DEAD 6
#define GOR_G_LEAKED 10
#define GOR_G_DEADEXTRA 11

/* Indices of gor_counts. */
#define GOR_NO_LAYOUT 0  /* an event of a process the agent has not described: lost */
#define GOR_COUNTERS 1

#ifndef GOR_MAX_PROCS
#define GOR_MAX_PROCS 4096
#endif

/* struct gor_layout: bpfprof.h */
BPF_HASH(gor_procs, u32, struct gor_layout, GOR_MAX_PROCS);
BPF_PERCPU_ARRAY(gor_counts, u64, GOR_COUNTERS);

static __always_inline void gor_count(u32 what)
{
    u64 *c = gor_counts.lookup(&what);
    if (c)
        (*c)++;
}

static __always_inline u64 gor_read(u64 addr)
{
    u64 v = 0;
    bpf_probe_read_user(&v, sizeof(v), (void *)addr);
    return v;
}

static __always_inline void gor_output(struct bpfprof_stack_record *r, u64 frames)
{
    frames &= BPFPROF_FRAMES_MASK;
    r->h.user_frames = frames;
    u64 size = sizeof(struct bpfprof_header) + frames * sizeof(u64);
    if (records.ringbuf_output(r, size, rb_flags(size)) != 0)
        count_drop(BPFPROF_DROP_RINGBUF_FULL);
}

int gor_casgstatus(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    u32 oldval = ctx->bx, newval = ctx->cx;
    int old_dead = oldval == GOR_G_DEAD || oldval == GOR_G_DEADEXTRA;
    int new_dead = newval == GOR_G_DEAD || newval == GOR_G_DEADEXTRA;
    u64 ev;
    if (old_dead && !new_dead)
        ev = GOR_EV_CREATE;
    else if (new_dead && !old_dead && oldval != GOR_G_IDLE)
        ev = GOR_EV_EXIT;
    else if (oldval == GOR_G_WAITING && newval != GOR_G_LEAKED)  /* a leaked goroutine stays where it parked */
        ev = GOR_EV_WAKE;
    else
        return 0;
    struct gor_layout *l = gor_procs.lookup(&tgid);
    if (!l) {
        gor_count(GOR_NO_LAYOUT);
        return 0;
    }
    u64 gp = ctx->ax;
    u64 goid = gor_read(gp + l->goid);
    if (ev != GOR_EV_CREATE) {
        struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_GOROUTINE, (ev << GOR_EV_SHIFT) | newval, goid);
        if (r)
            submit_header(r);
        return 0;
    }
    u64 labels = gor_read(gp + l->labels);
    u64 startpc = gor_read(gp + l->startpc);
    u64 gopc = gor_read(gp + l->gopc);
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_GOROUTINE,
                                                (ev << GOR_EV_SHIFT) | (labels & GOR_PAYLOAD_MASK), goid);
    if (!r)
        return 0;
    r->ips[0] = startpc;
    r->ips[1] = gopc;
    gor_output(r, 2);
    return 0;
}

/* gopark's own stack, from its entry (common.bpf.h read_frameless_user_stack). */
int gor_gopark(struct pt_regs *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    struct gor_layout *l = gor_procs.lookup(&tgid);
    if (!l) {
        gor_count(GOR_NO_LAYOUT);
        return 0;
    }
    u64 g = ctx->r14;
    u64 goid = gor_read(g + l->goid);
    u64 labels = gor_read(g + l->labels);
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_GOROUTINE,
                                                (GOR_EV_PARK << GOR_EV_SHIFT) | (labels & GOR_PAYLOAD_MASK), goid);
    if (!r)
        return 0;
    gor_output(r, read_frameless_user_stack(ctx, r));
    return 0;
}

int gor_on_exec(void *ctx)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    struct bpfprof_stack_record *r = new_record(BPFPROF_KIND_GOROUTINE, (GOR_EV_EXEC << GOR_EV_SHIFT) | tgid, 0);
    if (r) {
        r->h.pid = 0;
        r->h.tid = 0;
        submit_header_flags(r, RB_NOW);  /* its uprobes go in before it runs far */
    }
    return 0;
}
