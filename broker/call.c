/* call: call table, free list and held frames; see call.h. */
#include "call.h"

#include <string.h>

#include "alloc.h"

/* Free calls kept for reuse; beyond this a burst's calls go back to malloc. */
#define CALL_FREE_MAX 4096

void kp_calls_init(struct kp_calls *t)
{
    kp_idmap_init(&t->by_serial);
    t->free_list = NULL;
    t->free_count = 0;
    t->next_serial = 1;
}

void kp_calls_fini(struct kp_calls *t)
{
    size_t pos = 0;
    struct kp_call *c;
    while ((c = kp_idmap_next(&t->by_serial, &pos, NULL)) != NULL) {
        kp_call_drop_frames(c);
        kp_free(c);
    }
    kp_idmap_fini(&t->by_serial);
    while (t->free_list) {
        c = t->free_list;
        t->free_list = c->next_free;
        kp_free(c);
    }
    t->free_count = 0;
}

struct kp_call *kp_call_new(struct kp_calls *t)
{
    struct kp_call *c = t->free_list;
    if (c) {
        t->free_list = c->next_free;
        t->free_count--;
    } else {
        c = kp_malloc(sizeof *c);
    }
    memset(c, 0, offsetof(struct kp_call, inline_payload));
    c->serial = t->next_serial++;
    c->state = KP_CALL_QUEUED;
    kp_timer_init(&c->timer);
    kp_list_init(&c->queue_link);
    kp_list_init(&c->worker_link);
    c->payload = c->inline_payload;
    c->payload_cap = KP_CALL_INLINE_FRAMES;
    c->input_tail = &c->input;
    c->next_free = NULL;
    kp_idmap_put(&t->by_serial, c->serial, c);
    return c;
}

void kp_call_drop_frames(struct kp_call *c)
{
    for (size_t i = 0; i < c->npayload; i++)
        zmq_msg_close(&c->payload[i]);
    c->npayload = 0;
    if (c->payload != c->inline_payload) {
        kp_free(c->payload);
        c->payload = c->inline_payload;
        c->payload_cap = KP_CALL_INLINE_FRAMES;
    }
    if (c->has_header) {
        zmq_msg_close(&c->header);
        c->has_header = false;
    }
    struct kp_input *in;
    while ((in = kp_call_take_input(c)) != NULL)
        kp_input_free(in);
}

void kp_call_hold_input(struct kp_call *c, uint32_t kind, uint32_t flags, uint64_t sequence,
                        zmq_msg_t *frames, size_t n, const uint32_t *sizes, size_t nsizes)
{
    struct kp_input *in =
        kp_malloc(sizeof *in + n * sizeof in->frames[0] + nsizes * sizeof(uint32_t));
    in->next = NULL;
    in->kind = kind;
    in->flags = flags;
    in->sequence = sequence;
    in->n = n;
    in->nsizes = nsizes;
    in->sizes = (uint32_t *)(void *)&in->frames[n]; /* zmq_msg_t is 8-aligned: so is this */
    if (nsizes > 0)
        memcpy(in->sizes, sizes, nsizes * sizeof(uint32_t));
    for (size_t i = 0; i < n; i++) {
        zmq_msg_init(&in->frames[i]);
        zmq_msg_move(&in->frames[i], &frames[i]);
    }
    *c->input_tail = in;
    c->input_tail = &in->next;
}

struct kp_input *kp_call_take_input(struct kp_call *c)
{
    struct kp_input *in = c->input;
    if (in == NULL)
        return NULL;
    c->input = in->next;
    if (c->input == NULL)
        c->input_tail = &c->input;
    in->next = NULL;
    return in;
}

void kp_input_free(struct kp_input *in)
{
    if (in == NULL)
        return;
    for (size_t i = 0; i < in->n; i++)
        zmq_msg_close(&in->frames[i]);
    kp_free(in);
}

void kp_call_free(struct kp_calls *t, struct kp_call *c)
{
    kp_call_drop_frames(c);
    kp_idmap_del(&t->by_serial, c->serial);
    if (t->free_count >= CALL_FREE_MAX) {
        kp_free(c);
        return;
    }
    c->next_free = t->free_list;
    t->free_list = c;
    t->free_count++;
}

kp_dispatch_id kp_call_dispatch_id(const struct kp_call *c)
{
    return (kp_dispatch_id){(c->serial << 8) | c->attempt};
}

void kp_call_next_attempt(struct kp_call *c)
{
    c->attempt++;
}

struct kp_call *kp_calls_find(const struct kp_calls *t, kp_dispatch_id id)
{
    struct kp_call *c = kp_idmap_get(&t->by_serial, id.v >> 8);
    if (c == NULL || c->attempt != (uint8_t)(id.v & 0xff))
        return NULL;
    return c;
}

size_t kp_calls_count(const struct kp_calls *t)
{
    return kp_idmap_count(&t->by_serial);
}

void kp_call_hold_payload(struct kp_call *c, zmq_msg_t *frames, size_t n)
{
    if (c->npayload + n > c->payload_cap) {
        size_t cap = c->npayload + n;
        zmq_msg_t *p = kp_malloc(cap * sizeof *p);
        for (size_t i = 0; i < c->npayload; i++) {
            zmq_msg_init(&p[i]);
            zmq_msg_move(&p[i], &c->payload[i]);
        }
        if (c->payload != c->inline_payload)
            kp_free(c->payload);
        c->payload = p;
        c->payload_cap = cap;
    }
    for (size_t i = 0; i < n; i++) {
        zmq_msg_init(&c->payload[c->npayload]);
        zmq_msg_move(&c->payload[c->npayload], &frames[i]);
        c->npayload++;
    }
}

void kp_call_hold_header(struct kp_call *c, zmq_msg_t *frame)
{
    if (c->has_header)
        zmq_msg_close(&c->header);
    zmq_msg_init(&c->header);
    zmq_msg_move(&c->header, frame);
    c->has_header = true;
}
