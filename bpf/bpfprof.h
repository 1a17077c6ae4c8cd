/* Shared record layout of bpfprof's BPF programs.
 *
 * Every probe family writes records into a BPF ring buffer; each record starts
 * with struct bpfprof_header. Its Python mirror is agent/bpfload/records.py; a test
 * checks the sizes agree (tests/unit/test_records_layout.py).
 *
 * Stacks travel inside the record (bpf_get_stack, or the BPF walker of
 * unwind.bpf.h), not as stack-map ids: a
 * stack map is a hash table whose ids are reused once the agent deletes an
 * entry, so a daemon would either fill it or race its own deletions. Copying
 * at most 127 kernel + 128 user addresses costs ~2 KiB per sample of ring
 * buffer (~100 B for a typical stack), which at
 * 99 Hz per CPU is nothing, and nothing can collide.
 */
#ifndef BPFPROF_H
#define BPFPROF_H

#define BPFPROF_MAX_FRAMES 127  /* the kernel's default perf_event_max_stack */
/* The verifier bound of a frame count: `n & BPFPROF_FRAMES_MASK` leaves every
 * count 0..BPFPROF_MAX_FRAMES as it is only when BPFPROF_MAX_FRAMES + 1 is a
 * power of two, which the assertion checks. */
#define BPFPROF_FRAMES_MASK BPFPROF_MAX_FRAMES
_Static_assert(((BPFPROF_MAX_FRAMES + 1) & BPFPROF_MAX_FRAMES) == 0,
               "BPFPROF_MAX_FRAMES + 1 must be a power of two: BPFPROF_FRAMES_MASK bounds frame counts");
/* User frames of a stack unwound in BPF (bpf/unwind.bpf.h); frame-pointer
 * stacks (bpf_get_stack) stay within BPFPROF_MAX_FRAMES. */
#define BPFPROF_MAX_USER_FRAMES 128
/* Room for a record's addresses, kernel then user: a power of two, so that
 * an index masked by BPFPROF_IPS - 1 stays inside. */
#define BPFPROF_IPS 256
_Static_assert(BPFPROF_MAX_FRAMES + BPFPROF_MAX_USER_FRAMES <= BPFPROF_IPS, "ips[] holds a full stack");
#define BPFPROF_COMM_LEN 16

/* Record kinds. Each probe family owns a range; agent/bpfload/records.py mirrors them. */
enum bpfprof_kind {
    BPFPROF_KIND_CPU = 1,       /* value: 1 sample */
    BPFPROF_KIND_OFFCPU = 2,    /* value: ns off CPU */
    BPFPROF_KIND_ALLOC = 3,     /* value: bytes; aux: address */
    BPFPROF_KIND_FREE = 4,      /* value: 0; aux: address; no stack */
    BPFPROF_KIND_LOCK = 5,      /* value: ns waited; aux: lock address */
    BPFPROF_KIND_GOROUTINE = 6, /* value: event; aux: goroutine id */
    BPFPROF_KIND_GO_EXIT = 7,   /* a Go process stopped at runtime.exit, to be read before it exits */
};

/* Indices of the per-CPU `drops` counter array. */
enum bpfprof_drop {
    BPFPROF_DROP_RINGBUF_FULL = 0,    /* record lost: ring buffer full */
    BPFPROF_DROP_USER_STACK_ERR = 1,  /* bpf_get_stack(user) failed: frames lost */
    BPFPROF_DROP_KERNEL_STACK_ERR = 2,
    BPFPROF_DROP_USER_TRUNCATED = 3,  /* stack deeper than BPFPROF_MAX_FRAMES */
    BPFPROF_DROP_KERNEL_TRUNCATED = 4,
    BPFPROF_DROP_LABELS_TRUNCATED = 5, /* Go labels beyond BPFPROF_MAX_LABELS or longer than a slot */
    BPFPROF_DROP_TRACE_CTX_READ_ERR = 6, /* a user read on the way to the trace context failed */
    BPFPROF_DROP_PY_READ_ERR = 7,  /* a user read on the way to the Python frames failed */
    BPFPROF_DROP_PY_TRUNCATED = 8, /* Python stack deeper than BPFPROF_PY_MAX_FRAMES: outer frames lost */
    BPFPROF_DROP_PY_THREAD_UNSEEN = 9, /* the thread's state not reached yet among many (python.bpf.h) */
    BPFPROF_DROP_MAX = 10,
};

/* Kind of the trace context a record may carry after its addresses. */
enum bpfprof_ctx_kind {
    BPFPROF_CTX_NONE = 0,
    BPFPROF_CTX_OTEL = 1,       /* struct bpfprof_otel_ctx: an OTEP 4947 thread context record */
    BPFPROF_CTX_GO_LABELS = 2,  /* struct bpfprof_go_labels: the running goroutine's pprof labels */
    /* 3: BPFPROF_CTX_USTACK (ustack.bpf.h) */
    BPFPROF_CTX_PYTHON = 4,     /* struct bpfprof_py_frames (python.bpf.h): the thread's CPython frames */
};

/* CPython frames (python.bpf.h): one word per frame, leaf first. */
#define BPFPROF_PY_MAX_FRAMES 64            /* a power of two (the index mask) */
#define BPFPROF_PY_CODE_MASK 0xffffffffffffull  /* the code object's address: a user address fits 48 bits */
#define BPFPROF_PY_UNIT_SHIFT 48
#define BPFPROF_PY_UNIT_MASK 0x3fffull      /* index of the code unit run; larger indices are cut to it */
#define BPFPROF_PY_ENTRY_BIT 62             /* the frame a _PyEval_EvalFrameDefault call entered at */
/* 3.12+: the shim frame an eval call pushes under its first frame (no code object): the word before
 * it is that call's entry frame; the leaf word when the call has no frame (yet) */
#define BPFPROF_PY_SHIM (1ull << BPFPROF_PY_ENTRY_BIT)

struct bpfprof_header {
    u32 kind;          /* enum bpfprof_kind */
    u32 pid;           /* thread group id (the process) */
    u32 tid;           /* kernel thread id */
    u32 cpu;
    u64 ktime_ns;      /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
    u64 value;         /* meaning by kind, see enum bpfprof_kind */
    u64 aux;           /* meaning by kind (an address, an id), else 0 */
    u16 kernel_frames; /* number of kernel addresses, first in ips[] */
    u16 user_frames;   /* number of user addresses, after the kernel ones */
    s16 kernel_err;    /* 0, or the negative errno of bpf_get_stack */
    s16 user_err;
    char comm[BPFPROF_COMM_LEN]; /* thread name */
};

/* Trace context: the OTEP 4947 record's fixed part, as the process wrote it. */
struct bpfprof_otel_ctx {
    u8 trace_id[16];
    u8 span_id[8];
    u8 trace_flags;
    u8 pad[7];
};

#define BPFPROF_MAX_LABELS 8
#define BPFPROF_LABEL_KEY_LEN 32    /* "trace_id", "span_id" ... */
#define BPFPROF_LABEL_VALUE_LEN 64  /* a hex trace id is 32 */

/* One Go pprof label. The lengths are the Go string lengths: a length over the
 * slot size means the copy was cut (and counted). */
struct bpfprof_label {
    u16 key_len;
    u16 value_len;
    u32 pad;
    char key[BPFPROF_LABEL_KEY_LEN];
    char value[BPFPROF_LABEL_VALUE_LEN];
};

struct bpfprof_go_labels {
    u32 count;         /* labels[] entries filled */
    u16 total;         /* labels the goroutine had (count < total: truncated) */
    u16 cut;           /* labels whose key or value did not fit its slot */
    struct bpfprof_label labels[BPFPROF_MAX_LABELS];
};

/* Optional trailer of a record, right after its addresses. The header is
 * unchanged: a record longer than header + addresses carries one, and `size`
 * says how much of it was sent. */
struct bpfprof_trace_ctx {
    u32 kind;          /* enum bpfprof_ctx_kind */
    u32 size;          /* bytes sent: 8 + the used part of the union */
    union {
        struct bpfprof_otel_ctx otel;
        struct bpfprof_go_labels go;
    };
};

struct bpfprof_stack_record {
    struct bpfprof_header h;
    u64 ips[BPFPROF_IPS];  /* leaf first, kernel then user */
};

/* The per-CPU buffer a record is built in: room for the trailer after a full
 * stack. Kept out of bpfprof_stack_record, which families also store in maps
 * (offcpu's per-thread stash) that need no trace context. */
struct bpfprof_scratch {
    struct bpfprof_stack_record r;
    struct bpfprof_trace_ctx ctx_room;
    u64 py_room[1 + BPFPROF_PY_MAX_FRAMES];  /* the CPython frames trailer (python.bpf.h) */
};

/* Per-process facts the agent writes at first sight of a process whose trace
 * context can be read (map `trace_procs`, key: tgid). Offsets are from the
 * binary's DWARF, else a per-Go-version table (agent/go/layouts.py). */
#define BPFPROF_PROC_GO 1    /* read the running goroutine's pprof labels */
#define BPFPROF_PROC_OTEL 2  /* read the OTEP 4947 TLS pointer otel_thread_ctx_v1 */
#define BPFPROF_LABELS_MAP 1    /* Go <= 1.23: g.labels -> *map[string]string */
#define BPFPROF_LABELS_SLICE 2  /* Go >= 1.24: g.labels -> *[]struct{key, value string}, sorted */

struct bpfprof_proc_ctx {
    u32 flags;         /* BPFPROF_PROC_* */
    u16 g_m;           /* offsetof(runtime.g, m) */
    u16 m_curg;        /* offsetof(runtime.m, curg) */
    u16 g_labels;      /* offsetof(runtime.g, labels) */
    u8 labels_form;    /* BPFPROF_LABELS_* */
    u8 pad[5];
    s64 go_tls_g;      /* address of the current g's TLS slot minus the FS base (-8 for most Go binaries) */
    s64 otel_tls;      /* address of otel_thread_ctx_v1 minus the FS base */
};

/* The g offsets the goroutine probe reads at a casgstatus call (map `gor_procs` of
 * goroutine.bpf.c, key: tgid), from the binary's DWARF, else agent/go/layouts.py. */
struct gor_layout {
    u16 goid;     /* offsetof(runtime.g, goid) */
    u16 labels;   /* offsetof(runtime.g, labels) */
    u16 gopc;     /* offsetof(runtime.g, gopc) */
    u16 startpc;  /* offsetof(runtime.g, startpc) */
};

/* How a frame entered by a _PyEval_EvalFrameDefault call is told (entry_kind). */
#define BPFPROF_PY_ENTRY_BOOL 1     /* 3.11: _PyInterpreterFrame.is_entry */
#define BPFPROF_PY_ENTRY_OWNER 2    /* 3.12+: a shim frame (owner == owner_cstack) lies under it */
#define BPFPROF_PY_ENTRY_ALL 3      /* 3.9, 3.10: every PyFrameObject is an eval call of its own */
/* What frame_instr holds (instr_kind). */
#define BPFPROF_PY_INSTR_POINTER 0  /* a pointer to the code unit (3.11+) */
#define BPFPROF_PY_INSTR_LASTI_UNITS 1  /* int f_lasti, in code units (3.10) */
#define BPFPROF_PY_INSTR_LASTI_BYTES 2  /* int f_lasti, in bytes (3.9) */
#define BPFPROF_PY_NO_CFRAME 0xffff /* cframe_current_frame: tstate_frame points at the frame itself */

/* A `py_procs` value; agent/python/registry.py PyProc mirrors it (agent/python/layouts.py says which
 * field of which version each offset is). */
struct bpfprof_py_proc {
    u64 interpreters_head;  /* runtime address of _PyRuntime.interpreters.head */
    u16 interp_threads_head;
    u16 tstate_next;
    u16 tstate_thread_id;
    u16 tstate_frame;       /* ->frame (3.9, 3.10), ->cframe (3.11, 3.12), ->current_frame (3.13) */
    u16 cframe_current_frame;  /* or BPFPROF_PY_NO_CFRAME */
    u16 frame_code;
    u16 frame_previous;
    u16 frame_instr;
    u16 frame_entry;
    u16 code_adaptive;      /* offset of the first code unit in a code object */
    u8 entry_kind;          /* BPFPROF_PY_ENTRY_* */
    u8 instr_kind;          /* BPFPROF_PY_INSTR_* */
    u8 owner_cstack;        /* FRAME_OWNED_BY_CSTACK (BPFPROF_PY_ENTRY_OWNER) */
    u8 cframe_previous;     /* _PyCFrame.previous (3.11, 3.12); unused without a cframe */
    /* The same facts as the walk's loop reads them (agent/python/registry.py derives them), so that one
     * walk serves a family of versions without branching on the version inside its loop: */
    u8 shim_owner;          /* owner byte of a shim frame: owner_cstack (3.12+), 0xff (never: 3.11) */
    u8 entry_keep;          /* mask of the entry byte of other frames: 0 (3.12+), 0xff (3.11: is_entry) */
    u8 lasti_shift;         /* f_lasti >> this is the code unit: 1 (3.9, bytes), 0 (3.10) */
    u8 pad;
};

struct bpfprof_py_frames {
    u32 kind;   /* BPFPROF_CTX_PYTHON */
    u32 size;   /* 8 + 8 x frames */
    u64 frames[BPFPROF_PY_MAX_FRAMES];
};


#endif
