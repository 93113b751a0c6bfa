/* test_send: the frame-ownership rule of kp_broker_send (broker_impl.h). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "broker_impl.h"
#include "config.h"
#include "log.h"

/* A send with no routing frame (rid NULL) that the socket refuses has sent
 * nothing, so the caller keeps its payload frames, as for every error. */
Test(send, refused_send_without_routing_id_leaves_payload_to_caller)
{
    struct kp_config cfg;
    kp_config_init(&cfg);
    kp_log_set_level(KP_LOG_ERROR);
    free(cfg.frontend);
    free(cfg.backend);
    free(cfg.intake);
    cfg.frontend = strdup("inproc://test-send-fe");
    cfg.backend = strdup("inproc://test-send-be");
    cfg.intake = strdup("inproc://test-send-in");
    struct kp_broker *b;
    cr_assert_eq(kp_broker_new(&cfg, NULL, &b), KP_OK);

    /* PUSH with no peer: every send would block (EAGAIN). */
    void *push = zmq_socket(b->ctx, ZMQ_PUSH);
    cr_assert_not_null(push);
    zmq_msg_t payload;
    cr_assert_eq(zmq_msg_init_size(&payload, 5), 0);
    memcpy(zmq_msg_data(&payload), "hello", 5);
    kp_header h = kp_broker_header(KELPIE__V1__KIND__HEARTBEAT, 0);
    uint64_t failed = b->stats.send_failed;

    cr_assert_eq(kp_broker_send(b, push, NULL, 0, NULL, &h, &payload, 1), KP_EAGAIN);
    cr_assert_eq(zmq_msg_size(&payload), 5, "the caller's frame was consumed on an error");
    cr_assert_eq(memcmp(zmq_msg_data(&payload), "hello", 5), 0);
    cr_assert_eq(b->stats.send_failed, failed + 1, "the refused send is counted");

    zmq_msg_close(&payload);
    zmq_close(push);
    kp_broker_destroy(&b);
    kp_config_fini(&cfg);
}
