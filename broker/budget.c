/* budget: byte accounts charged by header frames; see budget.h. */
#include "budget.h"

#include <stdalign.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#include "alloc.h"

struct kp_budget {
    _Atomic uint64_t bytes;  /* queued now */
    _Atomic uint32_t refs;   /* the owner's + one per queued message (+ accounts on a total) */
    struct kp_budget *total; /* broker-wide account, or NULL for the total itself */
};

/* Prefix of each header frame's buffer: who to give the bytes back to. */
struct budget_tag {
    struct kp_budget *acct;
    uint64_t size;
    alignas(max_align_t) unsigned char data[]; /* the packed header */
};

struct kp_budget *kp_budget_new(struct kp_budget *total)
{
    struct kp_budget *b = kp_calloc(1, sizeof *b);
    atomic_init(&b->bytes, 0);
    atomic_init(&b->refs, 1);
    b->total = total;
    if (total)
        atomic_fetch_add_explicit(&total->refs, 1, memory_order_relaxed);
    return b;
}

void kp_budget_release(struct kp_budget **bp)
{
    struct kp_budget *b = *bp;
    *bp = NULL;
    while (b && atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) == 1) {
        struct kp_budget *total = b->total;
        kp_free(b);
        b = total;
    }
}

uint64_t kp_budget_queued(const struct kp_budget *b)
{
    return atomic_load_explicit(&((struct kp_budget *)b)->bytes, memory_order_relaxed);
}

/* libzmq's free callback for a header frame: runs on its I/O thread (or the
 * loop's, when a send fails) once the frame has left the pipe. */
static void budget_frame_free(void *data, void *hint)
{
    (void)data;
    struct budget_tag *tag = hint;
    struct kp_budget *acct = tag->acct;
    atomic_fetch_sub_explicit(&acct->bytes, tag->size, memory_order_relaxed);
    if (acct->total)
        atomic_fetch_sub_explicit(&acct->total->bytes, tag->size, memory_order_relaxed);
    kp_free(tag);
    kp_budget_release(&acct);
}

enum kp_err kp_budget_frame(struct kp_budget *acct, const kp_header *h, uint64_t size,
                            zmq_msg_t *out)
{
    /* Most headers fit here: encoded once, then copied, with no pass to
     * size them first. */
    uint8_t scratch[512];
    size_t n = kp_wire_pack_into(h, scratch, sizeof scratch);
    struct budget_tag *tag = kp_malloc(sizeof *tag + n);
    if (n <= sizeof scratch)
        memcpy(tag->data, scratch, n);
    else
        kp_wire_pack_into(h, tag->data, n);
    tag->acct = acct;
    tag->size = size + n;
    size = tag->size;
    atomic_fetch_add_explicit(&acct->refs, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&acct->bytes, size, memory_order_relaxed);
    if (acct->total)
        atomic_fetch_add_explicit(&acct->total->bytes, size, memory_order_relaxed);
    if (zmq_msg_init_data(out, tag->data, n, budget_frame_free, tag) != 0) {
        budget_frame_free(tag->data, tag);
        return KP_ESYS;
    }
    return KP_OK;
}

struct kp_budget_share {
    _Atomic uint32_t refs; /* the owner's + one per copy libzmq holds */
    struct kp_budget *total;
    uint64_t size;
    zmq_msg_t msg; /* a reference to the bytes, so they outlive the owner's */
};

struct kp_budget_share *kp_budget_share_new(struct kp_budget *total, const zmq_msg_t *msg)
{
    struct kp_budget_share *s = kp_calloc(1, sizeof *s);
    atomic_init(&s->refs, 1);
    s->total = total;
    atomic_fetch_add_explicit(&total->refs, 1, memory_order_relaxed);
    zmq_msg_init(&s->msg);
    zmq_msg_copy(&s->msg, (zmq_msg_t *)msg);
    s->size = zmq_msg_size(&s->msg);
    atomic_fetch_add_explicit(&total->bytes, s->size, memory_order_relaxed);
    return s;
}

void kp_budget_share_release(struct kp_budget_share **sp)
{
    struct kp_budget_share *s = *sp;
    *sp = NULL;
    if (s == NULL || atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
        return;
    atomic_fetch_sub_explicit(&s->total->bytes, s->size, memory_order_relaxed);
    zmq_msg_close(&s->msg);
    kp_budget_release(&s->total);
    kp_free(s);
}

static void share_copy_free(void *data, void *hint)
{
    (void)data;
    struct kp_budget_share *s = hint;
    atomic_fetch_add_explicit(&s->total->bytes, s->size, memory_order_relaxed);
    kp_budget_share_release(&s);
}

enum kp_err kp_budget_share_copy(struct kp_budget_share *s, zmq_msg_t *out)
{
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    /* Given back before the send charges it: the total never dips below
     * what is queued, since the share itself still holds size on it. */
    atomic_fetch_sub_explicit(&s->total->bytes, s->size, memory_order_relaxed);
    if (zmq_msg_init_data(out, zmq_msg_data(&s->msg), s->size, share_copy_free, s) != 0) {
        share_copy_free(NULL, s);
        return KP_ESYS;
    }
    return KP_OK;
}
