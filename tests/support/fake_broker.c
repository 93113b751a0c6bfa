/* fake_broker: see fake_broker.h. */
#include "fake_broker.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "kelpie_test.h"

void fake_open(fake *f)
{
    memset(f, 0, sizeof *f);
    f->ctx = zmq_ctx_new();
    f->sock = zmq_socket(f->ctx, ZMQ_ROUTER);
    int linger = 0, hwm = 0; /* a ROUTER drops what passes its HWM: floods must arrive */
    zmq_setsockopt(f->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(f->sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    cr_assert_eq(zmq_bind(f->sock, "tcp://127.0.0.1:*"), 0);
    size_t len = sizeof f->endpoint;
    zmq_getsockopt(f->sock, ZMQ_LAST_ENDPOINT, f->endpoint, &len);
}

void fake_close(fake *f)
{
    if (f->has_rid)
        zmq_msg_close(&f->rid);
    zmq_close(f->sock);
    zmq_ctx_term(f->ctx);
}

Kelpie__V1__Header *fake_recv(fake *f, int timeout_ms, char *payload, size_t *plen)
{
    zmq_pollitem_t item = {f->sock, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&item, 1, timeout_ms) <= 0)
        return NULL;
    if (f->has_rid)
        zmq_msg_close(&f->rid);
    zmq_msg_init(&f->rid);
    zmq_msg_recv(&f->rid, f->sock, 0);
    f->has_rid = true;
    zmq_msg_t frame;
    zmq_msg_init(&frame);
    zmq_msg_recv(&frame, f->sock, 0);
    Kelpie__V1__Header *h =
        kelpie__v1__header__unpack(NULL, zmq_msg_size(&frame), zmq_msg_data(&frame));
    bool more = zmq_msg_more(&frame);
    zmq_msg_close(&frame);
    if (plen)
        *plen = 0;
    while (more) {
        zmq_msg_init(&frame);
        zmq_msg_recv(&frame, f->sock, 0);
        if (payload && plen && *plen == 0) {
            *plen = zmq_msg_size(&frame);
            memcpy(payload, zmq_msg_data(&frame), *plen);
        }
        more = zmq_msg_more(&frame);
        zmq_msg_close(&frame);
    }
    cr_assert_not_null(h, "the library sent a header that does not decode");
    return h;
}

Kelpie__V1__Header *fake_expect(fake *f, Kelpie__V1__Kind kind, int timeout_ms, char *payload,
                                size_t *plen)
{
    int64_t end = kt_now_ms() + timeout_ms;
    while (kt_now_ms() < end) {
        Kelpie__V1__Header *h = fake_recv(f, (int)(end - kt_now_ms()), payload, plen);
        if (!h)
            break;
        if (h->kind == kind)
            return h;
        kelpie__v1__header__free_unpacked(h, NULL);
    }
    return NULL;
}

void fake_frames(fake *f, size_t n, const void *const *frames, const size_t *lens)
{
    cr_assert(f->has_rid);
    zmq_msg_t rid;
    zmq_msg_init(&rid);
    zmq_msg_copy(&rid, &f->rid);
    zmq_msg_send(&rid, f->sock, ZMQ_SNDMORE);
    for (size_t i = 0; i < n; i++)
        cr_assert_geq(zmq_send(f->sock, frames[i], lens[i], i + 1 < n ? ZMQ_SNDMORE : 0), 0);
}

void fake_send(fake *f, Kelpie__V1__Header *h, const void *payload, size_t len)
{
    h->version = 1;
    size_t size = kelpie__v1__header__get_packed_size(h);
    uint8_t *buf = malloc(size ? size : 1);
    cr_assert_not_null(buf);
    kelpie__v1__header__pack(h, buf);
    const void *frames[2] = {buf, payload};
    size_t lens[2] = {size, len};
    fake_frames(f, len ? 2 : 1, frames, lens);
    free(buf);
}

void fake_heartbeat(fake *f, uint64_t broker_id, uint64_t max_message_size)
{
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.kind = KELPIE__V1__KIND__HEARTBEAT;
    h.broker_id = broker_id;
    h.max_message_size = max_message_size;
    fake_send(f, &h, NULL, 0);
}

void fake_welcome(fake *f, uint64_t broker_id)
{
    Kelpie__V1__Header *h = fake_expect(f, KELPIE__V1__KIND__READY, 5000, NULL, NULL);
    cr_assert_not_null(h, "the worker never sent READY");
    kelpie__v1__header__free_unpacked(h, NULL);
    fake_heartbeat(f, broker_id, 16u << 20);
}
