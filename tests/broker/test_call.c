/* test_call: the call table, dispatch ids with attempts, held frames and
 * the free list. */
#include <criterion/criterion.h>
#include <string.h>

#include "call.h"
#include "wire.h"

static struct kp_calls calls;

static void setup(void)
{
    kp_calls_init(&calls);
}

static void teardown(void)
{
    kp_calls_fini(&calls);
}

TestSuite(call, .init = setup, .fini = teardown);

Test(call, dispatch_ids_find_the_current_attempt_only)
{
    struct kp_call *a = kp_call_new(&calls);
    struct kp_call *b = kp_call_new(&calls);
    cr_assert_neq(a->serial, b->serial);
    cr_assert_neq(a->serial, 0);
    kp_dispatch_id first = kp_call_dispatch_id(a);
    cr_assert_eq(kp_calls_find(&calls, first), a);
    kp_call_next_attempt(a);
    kp_dispatch_id second = kp_call_dispatch_id(a);
    cr_assert_neq(first.v, second.v);
    cr_assert_null(kp_calls_find(&calls, first), "an old attempt's answer must not match");
    cr_assert_eq(kp_calls_find(&calls, second), a);
    cr_assert_null(kp_calls_find(&calls, (kp_dispatch_id){0}));
    cr_assert_null(kp_calls_find(&calls, (kp_dispatch_id){0xffffffffffffffffull}));
    cr_assert_eq(kp_calls_count(&calls), 2);
    kp_call_free(&calls, a);
    cr_assert_null(kp_calls_find(&calls, second), "a freed call is unknown");
    cr_assert_eq(kp_calls_count(&calls), 1);
}

Test(call, freed_calls_are_reused_with_fresh_serials)
{
    struct kp_call *a = kp_call_new(&calls);
    uint64_t serial = a->serial;
    kp_call_free(&calls, a);
    struct kp_call *b = kp_call_new(&calls);
    cr_assert_eq(b, a, "the free list hands the same memory back");
    cr_assert_neq(b->serial, serial);
    cr_assert_eq(b->attempt, 0);
    cr_assert_eq(b->state, KP_CALL_QUEUED);
    cr_assert(!kp_timer_armed(&b->timer));
}

Test(call, holds_any_number_of_payload_frames_without_copying)
{
    struct kp_call *c = kp_call_new(&calls);
    enum { N = 7 };
    zmq_msg_t frames[N];
    void *data[N];
    for (int i = 0; i < N; i++) {
        zmq_msg_init_size(&frames[i], 100); /* over the inline size: a real buffer */
        memset(zmq_msg_data(&frames[i]), 'a' + i, 100);
        data[i] = zmq_msg_data(&frames[i]);
    }
    kp_call_hold_payload(c, frames, 2);
    kp_call_hold_payload(c, frames + 2, N - 2);
    cr_assert_eq(c->npayload, N);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(zmq_msg_data(&c->payload[i]), data[i], "frame %d was copied", i);
        cr_assert_eq(zmq_msg_size(&frames[i]), 0, "frame %d was not moved out", i);
        zmq_msg_close(&frames[i]);
    }
    zmq_msg_t header;
    zmq_msg_init_size(&header, 10);
    kp_call_hold_header(c, &header);
    cr_assert(c->has_header);
    zmq_msg_close(&header);
    kp_call_drop_frames(c);
    cr_assert_eq(c->npayload, 0);
    cr_assert(!c->has_header);
    cr_assert_eq(c->payload, c->inline_payload);
    kp_call_free(&calls, c);
}

Test(call, fini_releases_live_calls_and_their_frames)
{
    for (int i = 0; i < 10; i++) {
        struct kp_call *c = kp_call_new(&calls);
        zmq_msg_t f;
        zmq_msg_init_size(&f, 1000);
        kp_call_hold_payload(c, &f, 1);
        zmq_msg_close(&f);
    }
    cr_assert_eq(kp_calls_count(&calls), 10);
    /* teardown's kp_calls_fini must free them; ASan's leak check verifies. */
}

Test(call, held_batch_keeps_its_message_sizes)
{
    /* A BATCH CHUNK held while the call is queued (protocol.md §5.8) must
     * reach the worker with the sizes that split its payload. */
    struct kp_call *c = kp_call_new(&calls);
    zmq_msg_t f;
    zmq_msg_init_size(&f, 6);
    memcpy(zmq_msg_data(&f), "abbccc", 6);
    uint32_t sizes[3] = {1, 2, 3};
    kp_call_hold_input(c, KELPIE__V1__KIND__CHUNK, KP_FLAG_BATCH, 4, &f, 1, sizes, 3);
    sizes[0] = 99; /* copied, not borrowed: the receive arena is reset after */
    zmq_msg_close(&f);
    struct kp_input *in = kp_call_take_input(c);
    cr_assert_not_null(in);
    cr_assert_eq(in->flags, KP_FLAG_BATCH);
    cr_assert_eq(in->sequence, 4);
    cr_assert_eq(in->nsizes, 3);
    cr_assert_eq(in->sizes[0], 1);
    cr_assert_eq(in->sizes[1], 2);
    cr_assert_eq(in->sizes[2], 3);
    cr_assert_eq(zmq_msg_size(&in->frames[0]), 6);
    kp_input_free(in);
    kp_call_free(&calls, c);
}

Test(call, held_input_comes_back_in_order_and_is_freed_with_the_call)
{
    struct kp_call *c = kp_call_new(&calls);
    cr_assert_null(kp_call_take_input(c));
    for (uint64_t seq = 0; seq < 3; seq++) {
        zmq_msg_t f;
        zmq_msg_init_size(&f, 100);
        memset(zmq_msg_data(&f), 'a' + (int)seq, 100);
        kp_call_hold_input(c, KELPIE__V1__KIND__CHUNK, 0, seq, &f, 1, NULL, 0);
        cr_assert_eq(zmq_msg_size(&f), 0, "the frame was not moved out");
        zmq_msg_close(&f);
    }
    kp_call_hold_input(c, KELPIE__V1__KIND__END, 0, 0, NULL, 0, NULL, 0);
    for (uint64_t seq = 0; seq < 2; seq++) {
        struct kp_input *in = kp_call_take_input(c);
        cr_assert_not_null(in);
        cr_assert_eq(in->kind, KELPIE__V1__KIND__CHUNK);
        cr_assert_eq(in->sequence, seq);
        cr_assert_eq(in->n, 1);
        cr_assert_eq(((char *)zmq_msg_data(&in->frames[0]))[0], 'a' + (int)seq);
        kp_input_free(in);
    }
    /* Taking the last one and holding again keeps the tail right. */
    zmq_msg_t f;
    zmq_msg_init_size(&f, 10);
    kp_call_hold_input(c, KELPIE__V1__KIND__CHUNK, KP_FLAG_COMPRESSED, 9, &f, 1, NULL, 0);
    zmq_msg_close(&f);
    struct kp_input *in = kp_call_take_input(c);
    cr_assert_eq(in->sequence, 2);
    kp_input_free(in);
    in = kp_call_take_input(c);
    cr_assert_eq(in->kind, KELPIE__V1__KIND__END);
    kp_input_free(in);
    in = kp_call_take_input(c);
    cr_assert_eq(in->sequence, 9);
    cr_assert_eq(in->flags, KP_FLAG_COMPRESSED);
    kp_input_free(in);
    cr_assert_null(kp_call_take_input(c));
    kp_call_hold_input(c, KELPIE__V1__KIND__END, 0, 0, NULL, 0, NULL, 0);
    /* Freeing the call frees what it still holds; ASan's leak check verifies. */
    kp_call_free(&calls, c);
}
