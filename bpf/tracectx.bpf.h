/* Readers of a sampled thread's trace context: the running goroutine's pprof
 * labels (Go) and the OTEP 4947 thread context record (native code).
 *
 * Pure functions over user memory (bpf_probe_read_user): no maps, so BCC's
 * map rewriting (main file only) is not needed here; common.bpf.h looks up
 * the per-process facts and the scratch buffer and calls these.
 *
 * Every read can fail (the page is not resident, the pointer is stale): the
 * readers return -1 then and the caller counts it. Return 1: `out` filled,
 * 0: nothing to report.
 */
#ifndef BPFPROF_TRACECTX_BPF_H
#define BPFPROF_TRACECTX_BPF_H

#include "bpfprof.h"

/* Go's runtime (Go 1.21-1.23 map form): runtime/map.go, amd64 */
#define GO_HMAP_B 9
#define GO_HMAP_BUCKETS 16
#define GO_HMAP_OLDBUCKETS 24
#define GO_BUCKET_SLOTS 8
#define GO_BUCKET_KEYS 8          /* tophash[8], then 8 string keys */
#define GO_BUCKET_VALUES 136      /* then 8 string values */
#define GO_BUCKET_SIZE 272        /* then the overflow pointer */
#define GO_MIN_TOPHASH 5          /* tophash >= 5: slot in use; 2..4: evacuated; 0, 1: empty */
#define GO_MAP_MAX_BUCKETS 2      /* B <= 1: up to 13 labels; bigger maps are cut and counted */

/* OTEP 4947 record: trace_id[16] span_id[8] valid trace_flags attrs_size, byte-packed */
#define OTEL_CTX_HEADER_SIZE 28

struct go_string {
    u64 ptr;
    u64 len;
};

static __always_inline int read_user_u64(u64 *dst, u64 addr)
{
    return bpf_probe_read_user(dst, sizeof(*dst), (void *)addr) == 0 ? 0 : -1;
}

/* Copy at most `cap` bytes of a Go string; `cap` is a constant so the verifier
 * can bound the copy. Returns -1 if the read failed. */
static __always_inline int copy_go_string(char *dst, u32 cap, struct go_string *s)
{
    u32 n = s->len > cap ? cap : (u32)s->len;
    if (n == 0)
        return 0;
    if (n > cap)  /* again, for the verifier */
        return 0;
    return bpf_probe_read_user(dst, n, (void *)s->ptr) == 0 ? 0 : -1;
}

static __always_inline int put_label(struct bpfprof_go_labels *out, struct go_string *k, struct go_string *v)
{
    u32 i = out->count;
    if (i >= BPFPROF_MAX_LABELS)
        return 0;
    struct bpfprof_label *l = &out->labels[i & (BPFPROF_MAX_LABELS - 1)];
    l->key_len = k->len > 0xffff ? 0xffff : k->len;
    l->value_len = v->len > 0xffff ? 0xffff : v->len;
    if (k->len > BPFPROF_LABEL_KEY_LEN || v->len > BPFPROF_LABEL_VALUE_LEN)
        out->cut++;
    if (copy_go_string(l->key, BPFPROF_LABEL_KEY_LEN, k) < 0)
        return -1;
    if (copy_go_string(l->value, BPFPROF_LABEL_VALUE_LEN, v) < 0)
        return -1;
    out->count = i + 1;
    return 0;
}

/* Go >= 1.24: labels -> {data, len, cap} of sorted {key, value string} pairs. */
static __always_inline int read_go_label_slice(u64 labels, struct bpfprof_go_labels *out)
{
    struct go_string slice;  /* data pointer and length: same shape as a string header */
    if (bpf_probe_read_user(&slice, sizeof(slice), (void *)labels) != 0)
        return -1;
    out->total = slice.len > 0xffff ? 0xffff : slice.len;
#pragma unroll
    for (int i = 0; i < BPFPROF_MAX_LABELS; i++) {
        if (i >= slice.len)
            break;
        struct go_string kv[2];
        if (bpf_probe_read_user(kv, sizeof(kv), (void *)(slice.ptr + i * sizeof(kv))) != 0)
            return -1;
        if (put_label(out, &kv[0], &kv[1]) < 0)
            return -1;
    }
    return 1;
}

/* Go <= 1.23: labels -> *hmap of map[string]string. Label maps are built once
 * and never written again, so no writer races the read; but a map whose last
 * insert started a grow still has entries in its old bucket, so that one is
 * read too (slots not yet evacuated). Bigger maps (B > 1, overflow buckets)
 * are read in part and counted as truncated. */
static __always_inline int read_go_label_map(u64 labels, struct bpfprof_go_labels *out)
{
    u64 h;
    if (read_user_u64(&h, labels) < 0)
        return -1;
    if (h == 0)
        return 0;
    u64 hdr[6];
    if (bpf_probe_read_user(hdr, sizeof(hdr), (void *)h) != 0)
        return -1;
    u64 count = hdr[0];
    u8 b = (hdr[1] >> 8) & 0xff;  /* flags at byte 8, B at byte 9 */
    u64 buckets = hdr[GO_HMAP_BUCKETS / 8], old = hdr[GO_HMAP_OLDBUCKETS / 8];
    out->total = count > 0xffff ? 0xffff : count;
    if (count == 0 || buckets == 0)
        return 1;
    u32 nbuckets = b == 0 ? 1 : GO_MAP_MAX_BUCKETS;
#pragma unroll
    for (int bi = 0; bi < GO_MAP_MAX_BUCKETS + 1; bi++) {
        u64 bucket;
        if (bi < GO_MAP_MAX_BUCKETS) {
            if (bi >= nbuckets)
                continue;
            bucket = buckets + bi * GO_BUCKET_SIZE;
        } else {
            if (old == 0)
                continue;
            bucket = old;  /* a grow from B=0 to B=1 left one old bucket */
        }
        u64 tophash;
        if (read_user_u64(&tophash, bucket) < 0)
            return -1;
#pragma unroll
        for (int s = 0; s < GO_BUCKET_SLOTS; s++) {
            u8 top = (tophash >> (8 * s)) & 0xff;
            if (top < GO_MIN_TOPHASH)
                continue;
            struct go_string k, v;
            if (bpf_probe_read_user(&k, sizeof(k), (void *)(bucket + GO_BUCKET_KEYS + s * 16)) != 0)
                return -1;
            if (bpf_probe_read_user(&v, sizeof(v), (void *)(bucket + GO_BUCKET_VALUES + s * 16)) != 0)
                return -1;
            if (put_label(out, &k, &v) < 0)
                return -1;
        }
    }
    return 1;
}

/* The running goroutine's labels. `fsbase` is the thread's FS base (0 if
 * unknown); `g_hint` a candidate g from R14 for user-mode samples when the FS
 * base is unknown (in Go's own code R14 holds g). */
static __always_inline int read_go_labels(const struct bpfprof_proc_ctx *pc, u64 fsbase, u64 g_hint,
                                          struct bpfprof_trace_ctx *out)
{
    u64 g = g_hint, m, curg, labels;
    if (fsbase != 0 && read_user_u64(&g, fsbase + pc->go_tls_g) < 0)
        return -1;
    if (g == 0)
        return 0;  /* a thread Go does not run (yet) */
    /* From g0/gsignal (scheduler, signal handler) too: m.curg is the goroutine the thread runs. */
    if (read_user_u64(&m, g + pc->g_m) < 0)
        return -1;
    if (m == 0)
        return 0;
    if (read_user_u64(&curg, m + pc->m_curg) < 0)
        return -1;
    if (curg == 0)
        return 0;  /* in the scheduler between goroutines */
    if (read_user_u64(&labels, curg + pc->g_labels) < 0)
        return -1;
    if (labels == 0)
        return 0;
    out->go.count = 0;
    out->go.total = 0;
    out->go.cut = 0;
    int rc = pc->labels_form == BPFPROF_LABELS_SLICE ? read_go_label_slice(labels, &out->go)
                                                      : read_go_label_map(labels, &out->go);
    if (rc <= 0)
        return rc;
    if (out->go.total == 0)
        return 0;
    out->kind = BPFPROF_CTX_GO_LABELS;
    out->size = 8 + 8 + out->go.count * sizeof(struct bpfprof_label);
    return 1;
}

/* The OTEP 4947 record the thread's otel_thread_ctx_v1 points to, if valid. */
static __always_inline int read_otel_ctx(const struct bpfprof_proc_ctx *pc, u64 fsbase, struct bpfprof_trace_ctx *out)
{
    if (fsbase == 0)
        return 0;
    u64 rec;
    if (read_user_u64(&rec, fsbase + pc->otel_tls) < 0)
        return -1;
    if (rec == 0)
        return 0;  /* detached */
    u8 hdr[OTEL_CTX_HEADER_SIZE];
    if (bpf_probe_read_user(hdr, sizeof(hdr), (void *)rec) != 0)
        return -1;
    if (hdr[24] != 1)
        return 0;  /* valid != 1: being written, or detached by flag */
    __builtin_memcpy(out->otel.trace_id, hdr, 16);
    __builtin_memcpy(out->otel.span_id, hdr + 16, 8);
    out->otel.trace_flags = hdr[25];
    out->kind = BPFPROF_CTX_OTEL;
    out->size = 8 + sizeof(struct bpfprof_otel_ctx);
    return 1;
}

#endif /* BPFPROF_TRACECTX_BPF_H */
