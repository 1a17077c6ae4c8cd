/* CPython frames read at sample time (issue #16).
 *
 * For a process registered in `py_procs` (agent/python/registry.py: the
 * address of _PyRuntime and the interpreter's struct offsets, from CPython's
 * own headers per version, agent/python/layouts.py), the sampled thread's
 * PyThreadState is found among the main interpreter's threads by its
 * thread_id, which is pthread_self(): on x86-64 glibc the thread's FS base.
 * Its frame chain is walked leaf first (tstate->frame's PyFrameObjects in
 * 3.9/3.10, tstate->cframe->current_frame's _PyInterpreterFrames in
 * 3.11/3.12, tstate->current_frame in 3.13), one word per Python frame into
 * the record's BPFPROF_CTX_PYTHON trailer: the code object's address, the
 * index of the code unit it ran, and whether the frame was the entry frame of
 * a _PyEval_EvalFrameDefault call (the agent puts each run of frames up to an
 * entry frame in place of that native frame). The versions tell entry frames
 * apart differently (entry_kind): a flag (3.11), a shim frame owned by the C
 * stack under them (3.12+: sent as a BPFPROF_PY_SHIM word), or every frame (3.9/3.10). Code objects
 * are resolved in the agent (agent/python/frames.py).
 *
 * Callers read the current thread's frames: cpu.bpf.c at each sample,
 * offcpu.bpf.c at a switch-out (kept until the switch-in sends the block),
 * lock.bpf.c at the end of a futex or kernel lock wait. The agent side is one
 * per capture too (agent/probes/python_stacks.py).
 *
 * Pasted after common.bpf.h (agent/probes/probe_set.py: BCC rewrites map
 * accesses only in its main file); the per-CPU trailer py_scratch is in
 * common.bpf.h, whose finish_record appends it.
 */
#ifndef BPFPROF_PYTHON_BPF_H
#define BPFPROF_PYTHON_BPF_H

#include "common.bpf.h"

#define PY_MAX_THREADS 32   /* thread states of the interpreter looked at per sample for the sampled one */

BPF_F_TABLE("hash", u32, struct bpfprof_py_proc, py_procs, MAX_TARGETS, BPF_F_NO_PREALLOC);

/* Where a thread's PyThreadState is: `ts` once found (checked by one read of its thread_id at each use);
 * until then `resume`, the state the next look starts at, `looks` made so far. New thread states go to
 * the head of the interpreter's list, so the main thread's is last: in a process with more threads than
 * one look reads, it is found over a few samples (each counted), then at once. `passed`: a whole look
 * found it nowhere (a thread Python does not know, as C libraries' own): later looks read the head
 * only, where a state it is given later (PyGILState_Ensure) goes, and count nothing. */
#define PY_MAX_LOOKS 32  /* a look resumed this many times starts again from the head (a stale resume) */
struct py_tstate_hint {
    u64 ts;
    u64 resume;
    u32 looks;
    u32 passed;
    u32 tgid;  /* the process it was found in: a thread id reused by another process starts over */
    u32 pad;
};
BPF_TABLE("lru_hash", u32, struct py_tstate_hint, py_tstates, 16384);

/* One word per frame from `frame` outwards into out->frames. `ek` is a constant at each call: entry
 * frames told by every frame being one and the code unit from f_lasti (BPFPROF_PY_ENTRY_ALL: 3.9, 3.10),
 * or by the frame's entry byte and the code unit from an instruction pointer (3.11+). Within a family
 * the versions differ only by values the loop reads (shim_owner, entry_keep, lasti_shift), not by
 * branches: the verifier walks one loop per family, a loop's worth of instructions per call site (a
 * walk per version took ~30k more of on_cpu_sample's, ~50 ms more to load). Returns the number of
 * words, -1 if a read failed; *rest is the frame the walk stopped at (0: the chain's end). */
static __always_inline int py_walk(struct bpfprof_py_proc *pp, struct bpfprof_py_frames *out, u64 frame,
                                   const int ek, u64 *rest)
{
    u64 off_code = pp->frame_code, off_instr = pp->frame_instr, off_prev = pp->frame_previous;
    u64 off_entry = pp->frame_entry, adaptive = pp->code_adaptive;
    u8 shim = pp->shim_owner, keep = pp->entry_keep;
    u64 shift = pp->lasti_shift & 1;
    int n = 0;
    for (int i = 0; i < BPFPROF_PY_MAX_FRAMES; i++) {
        if (frame == 0)
            break;
        u64 code = 0, instr = 0, prev = 0;
        u8 entry = 1;  /* BPFPROF_PY_ENTRY_ALL: every frame */
        if (bpf_probe_read_user(&code, 8, (void *)(frame + off_code)) != 0 ||
            bpf_probe_read_user(&instr, 8, (void *)(frame + off_instr)) != 0 ||
            bpf_probe_read_user(&prev, 8, (void *)(frame + off_prev)) != 0)
            return -1;
        if (ek != BPFPROF_PY_ENTRY_ALL && bpf_probe_read_user(&entry, 1, (void *)(frame + off_entry)) != 0)
            return -1;
        u64 word;
        if (ek != BPFPROF_PY_ENTRY_ALL && entry == shim) {
            word = BPFPROF_PY_SHIM;  /* the shim under an eval call's first frame: the word before it */
        } else {
            u64 unit = 0;
            if (ek != BPFPROF_PY_ENTRY_ALL) {
                entry &= keep;
                u64 first = code + adaptive;
                if (instr >= first)
                    unit = (instr - first) / 2;
            } else {
                s32 lasti = (s32)instr;  /* f_lasti, -1 before the first instruction */
                if (lasti > 0)
                    unit = (u64)lasti >> shift;
            }
            if (unit > BPFPROF_PY_UNIT_MASK)
                unit = BPFPROF_PY_UNIT_MASK;
            word = (code & BPFPROF_PY_CODE_MASK) | (unit << BPFPROF_PY_UNIT_SHIFT) |
                   ((u64)(entry != 0) << BPFPROF_PY_ENTRY_BIT);
        }
        out->frames[i & (BPFPROF_PY_MAX_FRAMES - 1)] = word;
        n = i + 1;
        frame = prev;
    }
    *rest = frame;
    return n;
}

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
    u32 thread = (u32)bpf_get_current_pid_tgid();
    struct py_tstate_hint *hint = py_tstates.lookup(&thread);
    if (hint && hint->tgid != tgid)
        hint = 0;
    u64 ts = 0, tid = 0;
    if (hint && hint->ts && bpf_probe_read_user(&tid, 8, (void *)(hint->ts + pp->tstate_thread_id)) == 0 &&
        tid == fsbase) {
        ts = hint->ts;
    } else {
        u32 passed = hint ? hint->passed : 0;
        u32 looks = hint && !passed && hint->resume && hint->looks < PY_MAX_LOOKS ? hint->looks : 0;
        ts = looks ? hint->resume : 0;
        if (ts == 0) {
            u64 interp = 0;
            if (bpf_probe_read_user(&interp, 8, (void *)pp->interpreters_head) != 0 || interp == 0)
                goto fail;
            if (bpf_probe_read_user(&ts, 8, (void *)(interp + pp->interp_threads_head)) != 0)
                goto fail;
        }
        tid = 0;
        for (int i = 0; i < PY_MAX_THREADS && ts; i++) {
            if (bpf_probe_read_user(&tid, 8, (void *)(ts + pp->tstate_thread_id)) != 0) {
                py_tstates.delete(&thread);  /* a stale place to resume from: the head next time */
                goto fail;
            }
            if (tid == fsbase)
                break;
            if (bpf_probe_read_user(&ts, 8, (void *)(ts + pp->tstate_next)) != 0) {
                py_tstates.delete(&thread);
                goto fail;
            }
        }
        struct py_tstate_hint h = {};
        h.tgid = tgid;
        if (ts != 0 && tid == fsbase) {
            h.ts = ts;
        } else if (ts != 0 && !passed) {
            h.resume = ts;  /* looked at all one look may: on from here at the next sample */
            h.looks = looks + 1;
        } else {
            h.passed = 1;  /* the list ended without it (or it was passed before): not a Python thread now */
        }
        py_tstates.update(&thread, &h);
        if (h.ts == 0) {
            if (h.resume)
                count_drop(BPFPROF_DROP_PY_THREAD_UNSEEN);
            return;  /* native frames only */
        }
    }
    u64 frame = 0, cur = 0;
    if (bpf_probe_read_user(&cur, 8, (void *)(ts + pp->tstate_frame)) != 0)
        goto fail;
    if (pp->cframe_current_frame == BPFPROF_PY_NO_CFRAME) {
        frame = cur;
    } else {
        if (cur == 0 || bpf_probe_read_user(&frame, 8, (void *)(cur + pp->cframe_current_frame)) != 0)
            goto fail;
        /* 3.11, 3.12: an eval call links its own _PyCFrame (tstate->cframe = &cframe, on its C stack) a few
         * instructions before it sets cframe.current_frame, which until then is whatever that stack slot
         * held: 0, an unreadable address, or a frame of an earlier call whose links are stale. Sampled
         * there, the frames to read are the caller's: its cframe (cframe.previous, set first) names the
         * frame that made the call, and the agent leaves the innermost eval frame native
         * (PythonFrames.merge: fewer runs than eval calls). A chain is the call's own when its first entry
         * frame (3.11: is_entry; 3.12: the C-stack shim) links to that caller frame. */
        u64 prev_cf = 0, caller = 0;
        if (bpf_probe_read_user(&prev_cf, 8, (void *)(cur + pp->cframe_previous)) != 0)
            goto fail;
        if (prev_cf != 0) {  /* 0: the thread's root cframe, whose current_frame is the chain's end */
            if (bpf_probe_read_user(&caller, 8, (void *)(prev_cf + pp->cframe_current_frame)) != 0)
                goto fail;
            u8 is_bool = pp->entry_kind == BPFPROF_PY_ENTRY_BOOL, cstack = pp->owner_cstack;
            u64 off_prev = pp->frame_previous, off_entry = pp->frame_entry, f = frame;
            int stale = frame == 0;  /* a chain unread past 64 frames (deep recursion in one call) is kept */
            for (int i = 0; i < BPFPROF_PY_MAX_FRAMES && !stale; i++) {
                u64 prev = 0;
                u8 mark = 0;
                if (bpf_probe_read_user(&prev, 8, (void *)(f + off_prev)) != 0 ||
                    bpf_probe_read_user(&mark, 1, (void *)(f + off_entry)) != 0) {
                    stale = 1;
                    break;
                }
                if (is_bool ? mark != 0 : mark == cstack) {
                    stale = prev != caller;
                    break;
                }
                f = prev;
                if (f == 0)
                    stale = 1;  /* the chain ended without the call's entry frame */
            }
            if (stale)
                frame = caller;
        }
    }
    int n;
    if (pp->entry_kind == BPFPROF_PY_ENTRY_ALL)
        n = py_walk(pp, out, frame, BPFPROF_PY_ENTRY_ALL, &frame);  /* 3.9, 3.10 */
    else
        n = py_walk(pp, out, frame, BPFPROF_PY_ENTRY_OWNER, &frame);  /* 3.11+ */
    if (n < 0)
        goto fail;
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
