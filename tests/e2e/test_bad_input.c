/*
 * test_bad_input.c: every kind of bad input from docs/protocol.md §9, sent
 * on raw sockets to a real kelpied. Each must be answered with the right
 * ERROR, counted in Stats under the right name, and leave the broker serving
 * good requests.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "kelpie_test.h"

TestSuite(bad_input, .fini = kt_teardown, .timeout = 60);

/* A broker with small limits and one echo worker; liveness x heartbeat is
 * 300 ms, so the NOT_FOUND start-up grace is short. */
static kt_broker *start(kt_slot *slot, uint32_t capacity)
{
    static const char *const args[] = {"--heartbeat-ms",
                                       "100",
                                       "--heartbeat-liveness",
                                       "3",
                                       "--max-message-size",
                                       "4096",
                                       "--max-header-size",
                                       "1024",
                                       "--queue-limit",
                                       "5",
                                       "--client-max-inflight",
                                       "8",
                                       NULL};
    kt_broker *b = kt_broker_start(args);
    cr_assert_not_null(b, "kelpied did not start");
    static kt_worker_opts opts;
    opts = (kt_worker_opts){
        .endpoint = b->backend, .capacity = capacity, .heartbeat_ms = 100, .slot = slot};
    cr_assert_gt(kt_worker_spawn(&opts), 0);
    cr_assert(kt_wait_stat(b, "workers", 1, 5000));
    return b;
}

/* The broker still answers a good call from a fresh client. */
static void assert_still_serving(const kt_broker *b)
{
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_call(c, "echo", "Echo", "fine", 4, 3000, &r), KELPIE_OK,
                 "the broker stopped serving after bad input");
    cr_assert_eq(r.len, 4);
    kelpie_reply_fini(&r);
    kelpie_client_destroy(&c);
}

/* Expects one ERROR with code on raw, carrying request_id. */
static void expect_error(kt_raw *raw, Kelpie__V1__Code code, uint64_t request_id)
{
    Kelpie__V1__Header *h = kt_raw_recv_header(raw, 3000);
    cr_assert_not_null(h, "no answer to bad input");
    cr_assert_eq(h->kind, KELPIE__V1__KIND__ERROR, "answer kind %d, not ERROR", h->kind);
    cr_assert_eq(h->code, code, "ERROR code %d, expected %d (%s)", h->code, code, h->message);
    cr_assert_eq(h->request_id, request_id);
    cr_assert_eq(h->version, 1);
    kelpie__v1__header__free_unpacked(h, NULL);
}

/* Sends frames, expects ERROR(code), and the counter to go up by one. */
static void check_frames(const kt_broker *b, int n, const void *const *data, const size_t *len,
                         Kelpie__V1__Code code, uint64_t request_id, const char *counter)
{
    double before = kt_stat(b, counter);
    cr_assert_geq(before, 0, "Stats has no counter %s", counter);
    kt_raw raw;
    cr_assert(kt_raw_open(&raw, b->frontend, ZMQ_DEALER));
    cr_assert(kt_raw_send_frames(&raw, n, data, len));
    expect_error(&raw, code, request_id);
    kt_raw_close(&raw);
    cr_assert(kt_wait_stat(b, counter, before + 1, 2000), "%s not counted", counter);
    assert_still_serving(b);
}

static void check_header(const kt_broker *b, const Kelpie__V1__Header *h, Kelpie__V1__Code code,
                         uint64_t request_id, const char *counter)
{
    size_t size = kelpie__v1__header__get_packed_size(h);
    uint8_t *buf = malloc(size + 1);
    kelpie__v1__header__pack(h, buf);
    const void *data[1] = {buf};
    size_t len[1] = {size};
    check_frames(b, 1, data, len, code, request_id, counter);
    free(buf);
}

static Kelpie__V1__Header request(uint64_t id)
{
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.version = 1;
    h.kind = KELPIE__V1__KIND__REQUEST;
    h.request_id = id;
    h.service = "echo";
    h.method = "Echo";
    return h;
}

Test(bad_input, missing_header_frame)
{
    kt_broker *b = start(NULL, 1);
    /* An empty first frame: no header at all. */
    const void *data[1] = {""};
    size_t len[1] = {0};
    check_frames(b, 1, data, len, KELPIE__V1__CODE__INVALID_ARGUMENT, 0, "bad_frames");
    kt_broker_stop(&b, 3000);
}

Test(bad_input, garbage_and_truncated_headers)
{
    kt_broker *b = start(NULL, 1);
    const void *garbage[2] = {"\xff\xff\xff\xff\xff\xff\xff", "payload"};
    size_t garbage_len[2] = {7, 7};
    check_frames(b, 2, garbage, garbage_len, KELPIE__V1__CODE__INVALID_ARGUMENT, 0, "bad_header");

    /* A good header cut in the middle of its service name. */
    Kelpie__V1__Header h = request(7);
    h.service = "a-service-name-long-enough-to-cut";
    size_t size = kelpie__v1__header__get_packed_size(&h);
    uint8_t *buf = malloc(size);
    kelpie__v1__header__pack(&h, buf);
    const void *cut[1] = {buf};
    size_t cut_len[1] = {size - 10};
    double before = kt_stat(b, "bad_header");
    kt_raw raw;
    cr_assert(kt_raw_open(&raw, b->frontend, ZMQ_DEALER));
    cr_assert(kt_raw_send_frames(&raw, 1, cut, cut_len));
    Kelpie__V1__Header *answer = kt_raw_recv_header(&raw, 3000);
    cr_assert_not_null(answer, "no answer to a truncated header");
    cr_assert_eq(answer->kind, KELPIE__V1__KIND__ERROR);
    cr_assert_eq(answer->code, KELPIE__V1__CODE__INVALID_ARGUMENT);
    /* The request id may or may not have been readable: 7 or 0. */
    cr_assert(answer->request_id == 7 || answer->request_id == 0);
    kelpie__v1__header__free_unpacked(answer, NULL);
    kt_raw_close(&raw);
    free(buf);
    cr_assert(kt_wait_stat(b, "bad_header", before + 1, 2000));
    assert_still_serving(b);
    kt_broker_stop(&b, 3000);
}

Test(bad_input, wrong_version)
{
    kt_broker *b = start(NULL, 1);
    Kelpie__V1__Header h = request(11);
    h.version = 2;
    check_header(b, &h, KELPIE__V1__CODE__FAILED_PRECONDITION, 11, "bad_version");
    kt_broker_stop(&b, 3000);
}

Test(bad_input, unknown_kind_and_kind_not_allowed)
{
    kt_broker *b = start(NULL, 1);
    Kelpie__V1__Header h = request(12);
    h.kind = (Kelpie__V1__Kind)99;
    check_header(b, &h, KELPIE__V1__CODE__UNIMPLEMENTED, 12, "bad_kind");
    /* READY is a worker's message; on the frontend it is not allowed. */
    h = request(13);
    h.kind = KELPIE__V1__KIND__READY;
    check_header(b, &h, KELPIE__V1__CODE__INVALID_ARGUMENT, 13, "bad_kind");
    /* So is REPLY from a client. */
    h = request(14);
    h.kind = KELPIE__V1__KIND__REPLY;
    check_header(b, &h, KELPIE__V1__CODE__INVALID_ARGUMENT, 14, "bad_kind");
    kt_broker_stop(&b, 3000);
}

Test(bad_input, oversized_messages)
{
    kt_broker *b = start(NULL, 1);
    /* Three 2000-byte frames: each under ZMQ_MAXMSGSIZE (4096), the whole
     * message over --max-message-size. */
    static char chunk[2000];
    Kelpie__V1__Header h = request(21);
    size_t size = kelpie__v1__header__get_packed_size(&h);
    uint8_t buf[256];
    kelpie__v1__header__pack(&h, buf);
    const void *data[4] = {buf, chunk, chunk, chunk};
    size_t len[4] = {size, sizeof chunk, sizeof chunk, sizeof chunk};
    check_frames(b, 4, data, len, KELPIE__V1__CODE__RESOURCE_EXHAUSTED, 21, "oversized");

    /* A header over --max-header-size (1024). */
    static char big[1500];
    memset(big, 'm', sizeof big - 1);
    h = request(22);
    h.method = big;
    check_header(b, &h, KELPIE__V1__CODE__RESOURCE_EXHAUSTED, 22, "oversized");

    /* One frame over ZMQ_MAXMSGSIZE: libzmq drops the connection before the
     * broker sees anything; the broker carries on. */
    static char huge[8192];
    kt_raw raw;
    cr_assert(kt_raw_open(&raw, b->frontend, ZMQ_DEALER));
    h = request(23);
    cr_assert(kt_raw_send_header(&raw, &h, huge, sizeof huge));
    cr_assert_null(kt_raw_recv_header(&raw, 300));
    kt_raw_close(&raw);
    assert_still_serving(b);
    kt_broker_stop(&b, 3000);
}

Test(bad_input, unknown_service_not_found)
{
    kt_broker *b = start(NULL, 1);
    kt_sleep_ms(400); /* past the start-up grace (liveness x heartbeat) */
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_reply r;
    cr_assert_eq(kelpie_client_call(c, "no.such.service", "Do", NULL, 0, 3000, &r),
                 KELPIE_NOT_FOUND);
    kelpie_reply_fini(&r);
    /* A call with no service at all is malformed. */
    Kelpie__V1__Header h = request(31);
    h.service = "";
    check_header(b, &h, KELPIE__V1__CODE__INVALID_ARGUMENT, 31, "bad_header");
    kelpie_client_destroy(&c);
    kt_broker_stop(&b, 3000);
}

Test(bad_input, request_id_zero_or_reused)
{
    kt_broker *b = start(NULL, 2);
    kt_raw raw;
    cr_assert(kt_raw_open(&raw, b->frontend, ZMQ_DEALER));
    Kelpie__V1__Header h = request(0);
    cr_assert(kt_raw_send_header(&raw, &h, NULL, 0));
    expect_error(&raw, KELPIE__V1__CODE__INVALID_ARGUMENT, 0);
    /* Id 5 outstanding (held by the worker), then 5 again. */
    h = request(5);
    h.method = "Forever";
    cr_assert(kt_raw_send_header(&raw, &h, NULL, 0));
    cr_assert(kt_wait_stat(b, "in_flight", 1, 2000));
    cr_assert(kt_raw_send_header(&raw, &h, NULL, 0));
    expect_error(&raw, KELPIE__V1__CODE__INVALID_ARGUMENT, 5);
    kt_raw_close(&raw);
    assert_still_serving(b);
    kt_broker_stop(&b, 3000);
}

Test(bad_input, worker_message_before_ready)
{
    kt_broker *b = start(NULL, 1);
    kt_raw raw;
    cr_assert(kt_raw_open(&raw, b->backend, ZMQ_DEALER));
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.version = 1;
    h.kind = KELPIE__V1__KIND__REPLY;
    h.request_id = 77;
    cr_assert(kt_raw_send_header(&raw, &h, "x", 1));
    expect_error(&raw, KELPIE__V1__CODE__FAILED_PRECONDITION, 77);
    kt_raw_close(&raw);
    cr_assert(kt_wait_stat(b, "not_ready", 1, 2000));
    assert_still_serving(b);
    kt_broker_stop(&b, 3000);
}

/* Sends n Forever calls on one client; returns how many were refused with
 * RESOURCE_EXHAUSTED within a short wait (the others stay outstanding). */
static int flood(kelpie_client *c, int n, kelpie_request_id *ids)
{
    kelpie_call_opts o = {.service = "echo", .method = "Forever", .timeout_ms = 20000};
    for (int i = 0; i < n; i++)
        cr_assert_eq(kelpie_client_send(c, &o, NULL, 0, &ids[i]), KELPIE_OK);
    int refused = 0;
    kelpie_reply r;
    while (kelpie_client_recv(c, &r, 500) == KELPIE_OK) {
        cr_assert_eq(r.status, KELPIE_RESOURCE_EXHAUSTED, "got %s: %s",
                     kelpie_status_name(r.status), r.message);
        refused++;
        kelpie_reply_fini(&r);
    }
    return refused;
}

/* Cancels every call still outstanding and takes their CANCELLED answers. */
static void cancel_all(kelpie_client *c, const kelpie_request_id *ids, int n)
{
    for (int i = 0; i < n; i++)
        kelpie_client_cancel(c, ids[i]); /* NOT_FOUND for the refused ones */
    kelpie_reply r;
    while (kelpie_client_outstanding(c) > 0) {
        cr_assert_eq(kelpie_client_recv(c, &r, 3000), KELPIE_OK, "a cancel went unanswered");
        cr_assert_eq(r.status, KELPIE_CANCELLED);
        kelpie_reply_fini(&r);
    }
}

Test(bad_input, flood_beyond_queue_limit)
{
    kt_slot *slot = kt_slots_new(1);
    kt_broker *b = start(slot, 1);
    /* Two clients so the per-client limit (8) is not what refuses: 1 runs,
     * 5 wait (--queue-limit 5), the rest are refused at once. */
    kelpie_client *c1 = kelpie_client_new(b->frontend);
    kelpie_client *c2 = kelpie_client_new(b->frontend);
    kelpie_request_id ids1[4], ids2[6];
    int refused = flood(c1, 4, ids1);
    refused += flood(c2, 6, ids2);
    cr_assert_eq(refused, 4, "%d refused, expected 10 - 1 running - 5 queued = 4", refused);
    cr_assert_eq(kt_stat(b, "queue_full"), 4);
    cr_assert_leq(kt_stat(b, "queued"), 5);
    cr_assert_eq(atomic_load(&slot->received), 1);
    cancel_all(c1, ids1, 4);
    cancel_all(c2, ids2, 6);
    kelpie_client_destroy(&c1);
    kelpie_client_destroy(&c2);
    cr_assert(kt_wait_stat_le(b, "queued", 0, 3000));
    assert_still_serving(b);
    kt_broker_stop(&b, 3000);
}

Test(bad_input, flood_beyond_client_max_inflight)
{
    kt_slot *slot = kt_slots_new(1);
    kt_broker *b = start(slot, 20);
    kelpie_client *c = kelpie_client_new(b->frontend);
    kelpie_request_id ids[12];
    int refused = flood(c, 12, ids);
    cr_assert_eq(refused, 4, "%d refused, expected 12 - 8 (--client-max-inflight)", refused);
    cr_assert_eq(kt_stat(b, "client_limit"), 4);
    cr_assert_eq(atomic_load(&slot->received), 8);
    cancel_all(c, ids, 12);
    kelpie_client_destroy(&c);
    assert_still_serving(b);
    kt_broker_stop(&b, 3000);
}

Test(bad_input, stray_answers_and_cancels_are_dropped_and_counted)
{
    kt_broker *b = start(NULL, 1);
    /* A worker answering a dispatch id it was never given. */
    kt_raw worker;
    cr_assert(kt_raw_open(&worker, b->backend, ZMQ_DEALER));
    char *services[1] = {"stray"};
    Kelpie__V1__Header h = KELPIE__V1__HEADER__INIT;
    h.version = 1;
    h.kind = KELPIE__V1__KIND__READY;
    h.credits = 1;
    h.heartbeat_ms = 100;
    h.n_services = 1;
    h.services = services;
    cr_assert(kt_raw_send_header(&worker, &h, NULL, 0));
    cr_assert(kt_wait_stat(b, "workers", 2, 3000));
    h = (Kelpie__V1__Header)KELPIE__V1__HEADER__INIT;
    h.version = 1;
    h.kind = KELPIE__V1__KIND__REPLY;
    h.request_id = 999999;
    cr_assert(kt_raw_send_header(&worker, &h, "stray", 5));
    cr_assert(kt_wait_stat(b, "replies_dropped_unknown", 1, 2000));
    kt_raw_close(&worker);

    /* A client cancelling a call it never made: ignored (no answer), counted. */
    kt_raw client;
    cr_assert(kt_raw_open(&client, b->frontend, ZMQ_DEALER));
    h = (Kelpie__V1__Header)KELPIE__V1__HEADER__INIT;
    h.version = 1;
    h.kind = KELPIE__V1__KIND__CANCEL;
    h.request_id = 4242;
    cr_assert(kt_raw_send_header(&client, &h, NULL, 0));
    cr_assert(kt_wait_stat(b, "cancel_unknown", 1, 2000));
    Kelpie__V1__Header *answer = kt_raw_recv_header(&client, 300);
    cr_assert_null(answer, "a CANCEL of an unknown id was answered (kind %d)",
                   answer ? (int)answer->kind : 0);
    kt_raw_close(&client);
    assert_still_serving(b);
    kt_broker_stop(&b, 3000);
}
