/* Shared record layout of bpfprof's BPF programs.
 *
 * Every probe family writes records into a BPF ring buffer; each record starts
 * with struct bpfprof_header. Its Python mirror is agent/records.py; a test
 * checks the sizes agree (tests/integration/test_records_layout.py).
 *
 * Stacks travel inside the record (bpf_get_stack), not as stack-map ids: a
 * stack map is a hash table whose ids are reused once the agent deletes an
 * entry, so a daemon would either fill it or race its own deletions. Copying
 * at most 2 x 127 addresses costs ~1 KiB per sample of ring buffer, which at
 * 99 Hz per CPU is nothing, and nothing can collide.
 */
#ifndef BPFPROF_H
#define BPFPROF_H

#define BPFPROF_MAX_FRAMES 127  /* the kernel's default perf_event_max_stack */
#define BPFPROF_COMM_LEN 16

/* Record kinds. Each probe family owns a range; agent/records.py mirrors them. */
enum bpfprof_kind {
    BPFPROF_KIND_CPU = 1,       /* value: 1 sample */
    BPFPROF_KIND_OFFCPU = 2,    /* value: ns off CPU */
    BPFPROF_KIND_ALLOC = 3,     /* value: bytes; aux: address */
    BPFPROF_KIND_FREE = 4,      /* value: 0; aux: address; no stack */
    BPFPROF_KIND_LOCK = 5,      /* value: ns waited; aux: lock address */
    BPFPROF_KIND_GOROUTINE = 6, /* value: event; aux: goroutine id */
};

/* Indices of the per-CPU `drops` counter array. */
enum bpfprof_drop {
    BPFPROF_DROP_RINGBUF_FULL = 0,    /* record lost: ring buffer full */
    BPFPROF_DROP_USER_STACK_ERR = 1,  /* bpf_get_stack(user) failed: frames lost */
    BPFPROF_DROP_KERNEL_STACK_ERR = 2,
    BPFPROF_DROP_USER_TRUNCATED = 3,  /* stack deeper than BPFPROF_MAX_FRAMES */
    BPFPROF_DROP_KERNEL_TRUNCATED = 4,
    BPFPROF_DROP_MAX = 5,
};

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

struct bpfprof_stack_record {
    struct bpfprof_header h;
    u64 ips[2 * BPFPROF_MAX_FRAMES];  /* leaf first, kernel then user */
};

#endif
