/* CPython frames read at sample time (issue #16).
 *
 * For a process registered in `py_procs` (agent/python/registry.py: the
 * address of _PyRuntime and the interpreter's struct offsets, from CPython's
 * own headers per version, agent/python/layouts.py), the sampled thread's
 * PyThreadState is found among the main interpreter's threads by its
 * thread_id, which is pthread_self(): on x86-64 glibc the thread's FS base.
 * Its frame chain (tstate->cframe->current_frame, 3.11) is walked leaf first,
 * one word per _PyInterpreterFrame into the record's BPFPROF_CTX_PYTHON
 * trailer: the code object's address, the index of the code unit it ran, and
 * whether the frame was the entry frame of a _PyEval_EvalFrameDefault call
 * (the agent puts each run of frames up to an entry frame in place of that
 * native frame). Code objects are resolved in the agent (agent/python/frames.py).
 *
 * Pasted after common.bpf.h (agent/probes/probe_set.py: BCC rewrites map
 * accesses only in its main file); the per-CPU trailer py_scratch is in
 * common.bpf.h, whose finish_record appends it.
 */
#ifndef BPFPROF_PYTHON_BPF_H
#define BPFPROF_PYTHON_BPF_H

#include "common.bpf.h"

#define PY_MAX_THREADS 32   /* threads of the interpreter looked at for the sampled one */

BPF_F_TABLE("hash", u32, struct bpfprof_py_proc, py_procs, MAX_TARGETS, BPF_F_NO_PREALLOC);
/* Read the current thread's Python frames into the per-CPU trailer, if its process is registered. */
static __always_inline void py_read_frames(u32 tgid, u64 fsbase)
{
    u32 zero = 0;
    struct bpfprof_py_proc *pp = py_procs.lookup(&tgid);
    if (!pp || fsbase == 0)
        return;
    struct bpfprof_py_frames *out = py_scratch.lookup(&zero);
    if (!out)
        return;
    u64 interp = 0, ts = 0, tid = 0;
    if (bpf_probe_read_user(&interp, 8, (void *)pp->interpreters_head) != 0 || interp == 0)
        goto fail;
    if (bpf_probe_read_user(&ts, 8, (void *)(interp + pp->interp_threads_head)) != 0)
        goto fail;
    for (int i = 0; i < PY_MAX_THREADS && ts; i++) {
        if (bpf_probe_read_user(&tid, 8, (void *)(ts + pp->tstate_thread_id)) != 0)
            goto fail;
        if (tid == fsbase)
            break;
        if (bpf_probe_read_user(&ts, 8, (void *)(ts + pp->tstate_next)) != 0)
            goto fail;
    }
    if (ts == 0 || tid != fsbase)
        return;  /* a thread Python does not know (yet): native frames only */
    u64 frame = 0, cframe = 0;
    if (bpf_probe_read_user(&cframe, 8, (void *)(ts + pp->tstate_cframe)) != 0 || cframe == 0)
        goto fail;
    if (bpf_probe_read_user(&frame, 8, (void *)(cframe + pp->cframe_current_frame)) != 0)
        goto fail;
    u32 n = 0;
    for (int i = 0; i < BPFPROF_PY_MAX_FRAMES; i++) {
        if (frame == 0)
            break;
        u64 code = 0, instr = 0, prev = 0;
        u8 entry = 0;
        if (bpf_probe_read_user(&code, 8, (void *)(frame + pp->frame_code)) != 0 ||
            bpf_probe_read_user(&instr, 8, (void *)(frame + pp->frame_instr)) != 0 ||
            bpf_probe_read_user(&entry, 1, (void *)(frame + pp->frame_entry)) != 0 ||
            bpf_probe_read_user(&prev, 8, (void *)(frame + pp->frame_previous)) != 0)
            goto fail;
        u64 first = code + pp->code_adaptive, unit = 0;
        if (instr >= first)
            unit = (instr - first) / 2;
        if (unit > BPFPROF_PY_UNIT_MASK)
            unit = BPFPROF_PY_UNIT_MASK;
        out->frames[i & (BPFPROF_PY_MAX_FRAMES - 1)] =
            (code & BPFPROF_PY_CODE_MASK) | (unit << BPFPROF_PY_UNIT_SHIFT) | ((u64)(entry != 0) << BPFPROF_PY_ENTRY_BIT);
        n = i + 1;
        frame = prev;
    }
    if (frame != 0)
        count_drop(BPFPROF_DROP_PY_TRUNCATED);
    if (n == 0)
        return;
    out->kind = BPFPROF_CTX_PYTHON;
    out->size = 8 + n * 8;
    return;
fail:
    count_drop(BPFPROF_DROP_PY_READ_ERR);
}

#endif /* BPFPROF_PYTHON_BPF_H */
