/* test_budget: header frames charge their message to a peer's account and
 * the broker-wide one until libzmq frees them, and accounts outlive their
 * owner while frames are out (run under ASan in CI to catch a use after free). */
#include <criterion/criterion.h>
#include <string.h>
#include <zmq.h>

#include "budget.h"

static kp_header header(uint64_t id)
{
    kp_header h = KELPIE__V1__HEADER__INIT;
    h.version = 1;
    h.kind = KELPIE__V1__KIND__REPLY;
    h.request_id = id;
    return h;
}

Test(budget, a_frame_charges_until_closed)
{
    struct kp_budget *total = kp_budget_new(NULL);
    struct kp_budget *peer = kp_budget_new(total);
    kp_header h = header(7);
    size_t n = kelpie__v1__header__get_packed_size(&h);
    zmq_msg_t m;
    cr_assert_eq(kp_budget_frame(peer, &h, 1000, &m), KP_OK);
    cr_assert_eq(zmq_msg_size(&m), n);
    kp_header *back = kelpie__v1__header__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
    cr_assert_not_null(back);
    cr_assert_eq(back->request_id, 7);
    kelpie__v1__header__free_unpacked(back, NULL);
    cr_assert_eq(kp_budget_queued(peer), 1000 + n);
    cr_assert_eq(kp_budget_queued(total), 1000 + n);
    zmq_msg_close(&m);
    cr_assert_eq(kp_budget_queued(peer), 0);
    cr_assert_eq(kp_budget_queued(total), 0);
    kp_budget_release(&peer);
    cr_assert_null(peer);
    kp_budget_release(&peer); /* idempotent */
    kp_budget_release(&total);
}

Test(budget, accounts_outlive_their_owners_while_frames_are_out)
{
    struct kp_budget *total = kp_budget_new(NULL);
    struct kp_budget *peer = kp_budget_new(total);
    kp_header h = header(1);
    zmq_msg_t a, b;
    cr_assert_eq(kp_budget_frame(peer, &h, 10, &a), KP_OK);
    cr_assert_eq(kp_budget_frame(total, &h, 20, &b), KP_OK);
    kp_budget_release(&peer);  /* the peer is forgotten, its frame is still queued */
    kp_budget_release(&total); /* the broker is gone too */
    zmq_msg_close(&b);
    zmq_msg_close(&a); /* frees the peer's account, then the total */
}

Test(budget, frames_sent_through_a_real_pipe_give_their_bytes_back)
{
    void *ctx = zmq_ctx_new();
    void *out = zmq_socket(ctx, ZMQ_PAIR), *in = zmq_socket(ctx, ZMQ_PAIR);
    cr_assert_eq(zmq_bind(in, "inproc://budget"), 0);
    cr_assert_eq(zmq_connect(out, "inproc://budget"), 0);
    struct kp_budget *total = kp_budget_new(NULL);
    struct kp_budget *peer = kp_budget_new(total);
    kp_header h = header(3);
    for (int i = 0; i < 100; i++) {
        zmq_msg_t m;
        cr_assert_eq(kp_budget_frame(peer, &h, 500, &m), KP_OK);
        cr_assert_geq(zmq_msg_send(&m, out, 0), 0);
    }
    cr_assert_gt(kp_budget_queued(peer), 100 * 500);
    for (int i = 0; i < 100; i++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        cr_assert_geq(zmq_msg_recv(&m, in, 0), 0);
        zmq_msg_close(&m);
    }
    cr_assert_eq(kp_budget_queued(peer), 0);
    cr_assert_eq(kp_budget_queued(total), 0);
    kp_budget_release(&peer);
    kp_budget_release(&total);
    zmq_close(out);
    zmq_close(in);
    zmq_ctx_term(ctx);
}

Test(budget, a_share_counts_its_bytes_once_against_the_total)
{
    struct kp_budget *total = kp_budget_new(NULL);
    struct kp_budget *p1 = kp_budget_new(total), *p2 = kp_budget_new(total);
    zmq_msg_t payload;
    zmq_msg_init_size(&payload, 4096);
    memset(zmq_msg_data(&payload), 'x', 4096);
    struct kp_budget_share *s = kp_budget_share_new(total, &payload);
    cr_assert_eq(kp_budget_queued(total), 4096);
    /* Two watchers are sent the payload: each send's header charges it. */
    kp_header h = header(3);
    size_t n = kelpie__v1__header__get_packed_size(&h);
    zmq_msg_t h1, h2, c1, c2;
    cr_assert_eq(kp_budget_share_copy(s, &c1), KP_OK);
    cr_assert_eq(kp_budget_frame(p1, &h, 4096, &h1), KP_OK);
    cr_assert_eq(kp_budget_share_copy(s, &c2), KP_OK);
    cr_assert_eq(kp_budget_frame(p2, &h, 4096, &h2), KP_OK);
    cr_assert_eq(zmq_msg_data(&c1), zmq_msg_data(&c2), "a copy, not a second buffer");
    cr_assert_eq(memcmp(zmq_msg_data(&c2), zmq_msg_data(&payload), 4096), 0);
    /* Each peer carries its message in full; the total, the bytes once. */
    cr_assert_eq(kp_budget_queued(p1), 4096 + n);
    cr_assert_eq(kp_budget_queued(p2), 4096 + n);
    cr_assert_eq(kp_budget_queued(total), 4096 + 2 * n);
    /* The owner lets go (the event left the job's buffer): the copies
     * still hold the bytes, and they still count. */
    zmq_msg_close(&payload);
    kp_budget_share_release(&s);
    cr_assert_null(s);
    kp_budget_share_release(&s); /* idempotent */
    cr_assert_eq(kp_budget_queued(total), 4096 + 2 * n);
    /* libzmq frees a header, then its payload (the encoder's order). */
    zmq_msg_close(&h1);
    zmq_msg_close(&c1);
    cr_assert_eq(kp_budget_queued(p1), 0);
    cr_assert_eq(kp_budget_queued(total), 4096 + n);
    zmq_msg_close(&h2);
    zmq_msg_close(&c2); /* the last reference: the bytes are given back and freed */
    cr_assert_eq(kp_budget_queued(total), 0);
    kp_budget_release(&p1);
    kp_budget_release(&p2);
    kp_budget_release(&total);
}
