/* fuzz_header: libFuzzer target for the header decoder and validator.
 *
 * Every input is treated as a header frame arriving from each of the three
 * directions, exactly as the broker does (kp_wire_parse), plus the
 * allocation-free request_id peek used for undecodable frames. When a frame
 * decodes, it is rewritten and re-encoded as on every broker hop and decoded
 * again; the round trip must keep what the broker relies on. The broker's
 * own decoder of common headers must agree with protobuf-c's. Crashes, leaks
 * and undefined behaviour are caught by the sanitizers.
 *
 * Built twice: as the real libFuzzer binary (KELPIE_FUZZ=ON, clang) and,
 * always, with replay.c as a plain driver that runs the corpus under ctest.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The broker's own reading of common headers (kp_wire_decode) against
 * protobuf-c's (kp_wire_decode_generic): the same verdict, and headers that
 * encode to the same bytes. */
static void fz_compare_decoders(const uint8_t *data, size_t size)
{
    static struct kp_arena fast_arena, generic_arena;
    static int ready;
    if (!ready) {
        kp_arena_init(&fast_arena, 16384);
        kp_arena_init(&generic_arena, 16384);
        ready = 1;
    }
    kp_header *fast, *generic;
    enum kp_err e1 = kp_wire_decode(&fast_arena, data, size, 65536, &fast);
    enum kp_err e2 = kp_wire_decode_generic(&generic_arena, data, size, 65536, &generic);
    if (e1 != e2)
        abort();
    if (e1 == KP_OK) {
        zmq_msg_t m1, m2;
        if (kp_wire_encode(fast, &m1) != KP_OK || kp_wire_encode(generic, &m2) != KP_OK)
            abort();
        if (zmq_msg_size(&m1) != zmq_msg_size(&m2) ||
            memcmp(zmq_msg_data(&m1), zmq_msg_data(&m2), zmq_msg_size(&m1)) != 0)
            abort();
        zmq_msg_close(&m1);
        zmq_msg_close(&m2);
    }
    kp_arena_reset(&fast_arena);
    kp_arena_reset(&generic_arena);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct kp_arena arena;
    static int ready;
    if (!ready) {
        kp_arena_init(&arena, 16384);
        ready = 1;
    }
    (void)kp_wire_peek_request_id(data, size);
    fz_compare_decoders(data, size);
    for (int dir = KP_FROM_CLIENT; dir <= KP_FROM_INTAKE; dir++) {
        kp_arena_reset(&arena);
        kp_header *h;
        enum kp_err err = kp_wire_parse(&arena, data, size, 65536, (enum kp_dir)dir, &h);
        (void)kp_strerror(err);
        (void)kp_err_code(err);
        if (h == NULL)
            continue;
        (void)kp_wire_kind_name((uint32_t)h->kind);
        /* What the broker does to a header on every hop. */
        h->request_id = ~h->request_id;
        h->timeout_ms = h->timeout_ms / 2;
        zmq_msg_t msg;
        if (kp_wire_encode(h, &msg) != KP_OK)
            abort();
        kp_header *again;
        if (kp_wire_decode(&arena, zmq_msg_data(&msg), zmq_msg_size(&msg), SIZE_MAX, &again) !=
                KP_OK &&
            zmq_msg_size(&msg) != 0)
            abort();
        if (zmq_msg_size(&msg) != 0 &&
            (again->request_id != h->request_id || again->kind != h->kind ||
             again->version != h->version || again->timeout_ms != h->timeout_ms ||
             again->n_services != h->n_services || again->n_metadata != h->n_metadata))
            abort();
        zmq_msg_close(&msg);
    }
    kp_arena_reset(&arena);
    return 0;
}
