/* A process forked by a target is a target: `bpfprof record -- CMD` follows
 * the command's children. Threads land here too (their tid is added), which
 * is harmless: a thread's tgid is its creator's, already a target.
 * Compiled in only when the capture follows children (agent/probes/probe_set.py). */
#include "common.bpf.h"

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
