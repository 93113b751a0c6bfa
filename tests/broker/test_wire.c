/* test_wire: decoding, validation and encoding of the KLP/1 header, for
 * every kind and every class of bad input (docs/protocol.md §4, §9). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

static struct kp_arena arena;

static void setup(void)
{
    kp_arena_init(&arena, 4096);
}

static void teardown(void)
{
    kp_arena_fini(&arena);
}

TestSuite(wire, .init = setup, .fini = teardown);

/* Packs h into a malloc'd buffer; *len gets its size. */
static uint8_t *tw_pack(const kp_header *h, size_t *len)
{
    *len = kelpie__v1__header__get_packed_size(h);
    uint8_t *buf = malloc(*len ? *len : 1);
    kelpie__v1__header__pack(h, buf);
    return buf;
}

static kp_header tw_header(kp_kind kind, uint64_t id)
{
    kp_header h = KELPIE__V1__HEADER__INIT;
    h.version = 1;
    h.kind = kind;
    h.request_id = id;
    return h;
}

static enum kp_err tw_parse(const kp_header *h, enum kp_dir dir)
{
    size_t len;
    uint8_t *buf = tw_pack(h, &len);
    kp_header *out;
    kp_arena_reset(&arena);
    enum kp_err err = kp_wire_parse(&arena, buf, len, 65536, dir, &out);
    free(buf);
    return err;
}

Test(wire, request_round_trip_keeps_every_field)
{
    kp_header h = tw_header(KELPIE__V1__KIND__REQUEST, 42);
    h.service = "echo";
    h.method = "Echo";
    h.timeout_ms = 1500;
    h.flags = KP_FLAG_IDEMPOTENT | KP_FLAG_STREAM;
    h.credits = 8;
    Kelpie__V1__Header__MetadataEntry e = KELPIE__V1__HEADER__METADATA_ENTRY__INIT;
    e.key = "trace-id";
    e.value.data = (uint8_t *)"abc";
    e.value.len = 3;
    Kelpie__V1__Header__MetadataEntry *entries[] = {&e};
    h.metadata = entries;
    h.n_metadata = 1;

    zmq_msg_t msg;
    cr_assert_eq(kp_wire_encode(&h, &msg), KP_OK);
    kp_header *out;
    cr_assert_eq(
        kp_wire_parse(&arena, zmq_msg_data(&msg), zmq_msg_size(&msg), 65536, KP_FROM_CLIENT, &out),
        KP_OK);
    cr_assert_eq(out->request_id, 42);
    cr_assert_str_eq(out->service, "echo");
    cr_assert_str_eq(out->method, "Echo");
    cr_assert_eq(out->timeout_ms, 1500);
    cr_assert_eq(out->flags, KP_FLAG_IDEMPOTENT | KP_FLAG_STREAM);
    cr_assert_eq(out->credits, 8);
    cr_assert_eq(out->n_metadata, 1);
    cr_assert_str_eq(out->metadata[0]->key, "trace-id");
    cr_assert_eq(out->metadata[0]->value.len, 3);
    zmq_msg_close(&msg);
}

Test(wire, every_known_kind_is_accepted_in_its_directions_only)
{
    /* §4's table, row by row: client, worker, intake. */
    static const struct {
        kp_kind kind;
        bool client, worker, intake;
    } table[] = {
        {KELPIE__V1__KIND__READY, false, true, false},
        {KELPIE__V1__KIND__REQUEST, true, false, true},
        {KELPIE__V1__KIND__REPLY, false, true, false},
        {KELPIE__V1__KIND__CHUNK, true, true, false}, /* client: a streamed request (§5.6) */
        {KELPIE__V1__KIND__END, true, true, false},
        {KELPIE__V1__KIND__ERROR, false, true, false},
        {KELPIE__V1__KIND__CANCEL, true, false, false},
        {KELPIE__V1__KIND__HEARTBEAT, true, true, false},
        {KELPIE__V1__KIND__DISCONNECT, true, true, false},
        {KELPIE__V1__KIND__CREDIT, true, true, false},
        {KELPIE__V1__KIND__STATUS, false, true, false},
        {KELPIE__V1__KIND__SUBMIT, true, false, true},
        {KELPIE__V1__KIND__ACCEPTED, false, false, false},
        {KELPIE__V1__KIND__JOB, false, false, false},
        {KELPIE__V1__KIND__PROGRESS, false, true, false},
        {KELPIE__V1__KIND__OUTPUT, false, true, false},
        {KELPIE__V1__KIND__RESULT, false, true, false},
        {KELPIE__V1__KIND__ACK, false, false, false},
        {KELPIE__V1__KIND__NACK, false, true, false},
        {KELPIE__V1__KIND__WATCH, true, false, false},
        {KELPIE__V1__KIND__INPUT, true, false, false}, /* client -> job stdin (§11.7) */
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        kp_header h = tw_header(table[i].kind, 9);
        h.service = "svc";
        bool allowed[] = {table[i].client, table[i].worker, table[i].intake};
        for (int dir = KP_FROM_CLIENT; dir <= KP_FROM_INTAKE; dir++) {
            enum kp_err want = allowed[dir] ? KP_OK : KP_EDIRECTION;
            cr_assert_eq(tw_parse(&h, (enum kp_dir)dir), want, "kind %s from dir %d: got %s",
                         kp_wire_kind_name(table[i].kind), dir,
                         kp_err_name(tw_parse(&h, (enum kp_dir)dir)));
        }
    }
}

Test(wire, unknown_kinds_are_unimplemented)
{
    static const int kinds[] = {0, 12, 13, 14, 15, 26, 99, 100000, -1};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        kp_header h = tw_header((kp_kind)kinds[i], 3);
        cr_assert_eq(tw_parse(&h, KP_FROM_CLIENT), KP_EUNKNOWNKIND, "kind %d", kinds[i]);
        cr_assert_eq(kp_err_code(KP_EUNKNOWNKIND), KELPIE__V1__CODE__UNIMPLEMENTED);
        cr_assert_str_eq(kp_wire_kind_name((uint32_t)kinds[i]), "UNKNOWN");
    }
}

Test(wire, wrong_version_is_a_failed_precondition)
{
    static const uint32_t versions[] = {0, 2, 7, UINT32_MAX};
    for (size_t i = 0; i < sizeof versions / sizeof versions[0]; i++) {
        kp_header h = tw_header(KELPIE__V1__KIND__REQUEST, 3);
        h.service = "svc";
        h.version = versions[i];
        cr_assert_eq(tw_parse(&h, KP_FROM_CLIENT), KP_EVERSION);
    }
    cr_assert_eq(kp_err_code(KP_EVERSION), KELPIE__V1__CODE__FAILED_PRECONDITION);
}

Test(wire, version_is_checked_before_kind)
{
    kp_header h = tw_header((kp_kind)99, 3);
    h.version = 2;
    cr_assert_eq(tw_parse(&h, KP_FROM_CLIENT), KP_EVERSION);
}

Test(wire, request_needs_an_id_from_clients_and_a_service_everywhere)
{
    kp_header h = tw_header(KELPIE__V1__KIND__REQUEST, 0);
    h.service = "svc";
    cr_assert_eq(tw_parse(&h, KP_FROM_CLIENT), KP_ENOREQUESTID);
    cr_assert_eq(tw_parse(&h, KP_FROM_INTAKE), KP_OK, "intake requests need no id");
    h.request_id = 5;
    h.service = "";
    cr_assert_eq(tw_parse(&h, KP_FROM_CLIENT), KP_ENOSERVICE);
    cr_assert_eq(tw_parse(&h, KP_FROM_INTAKE), KP_ENOSERVICE);
}

Test(wire, service_names_end_at_255_bytes)
{
    char name[257];
    memset(name, 'n', sizeof name - 1);
    name[255] = '\0';
    kp_header h = tw_header(KELPIE__V1__KIND__SUBMIT, 5);
    h.service = name;
    cr_assert_eq(tw_parse(&h, KP_FROM_CLIENT), KP_OK, "255 bytes is a name");
    name[255] = 'n';
    name[256] = '\0';
    cr_assert_eq(tw_parse(&h, KP_FROM_CLIENT), KP_ENAMELONG);
    h.kind = KELPIE__V1__KIND__REQUEST;
    cr_assert_eq(tw_parse(&h, KP_FROM_INTAKE), KP_ENAMELONG);
}

Test(wire, empty_frame_is_a_missing_header)
{
    kp_header *out = (kp_header *)1;
    cr_assert_eq(kp_wire_decode(&arena, "", 0, 65536, &out), KP_ENOHEADER);
    cr_assert_null(out);
}

Test(wire, garbage_does_not_decode)
{
    static const struct {
        const char *bytes;
        size_t len;
    } garbage[] = {
        {"\xff\xff\xff\xff\xff\xff\xff", 7}, /* endless varint */
        {"\x0f", 1},                         /* wire type 7 */
        {"\x22\x10"
         "abc",
         5}, /* length beyond the end */
        {"\x1a\x05"
         "echo",
         6},                     /* field 3 as bytes: wrong wire type */
        {"\x08", 1},             /* tag without value */
        {"\x0b\x0c", 2},         /* group start: not in proto3 */
        {"\x5a\x02\x0a\x80", 4}, /* metadata entry with a truncated key */
    };
    for (size_t i = 0; i < sizeof garbage / sizeof garbage[0]; i++) {
        kp_header *out;
        kp_arena_reset(&arena);
        cr_assert_eq(kp_wire_decode(&arena, garbage[i].bytes, garbage[i].len, 65536, &out),
                     KP_EBADHEADER, "garbage #%zu decoded", i);
        cr_assert_null(out);
    }
}

Test(wire, every_truncation_of_a_valid_header_fails_or_decodes_cleanly)
{
    kp_header h = tw_header(KELPIE__V1__KIND__REQUEST, 123456789);
    h.service = "a-service-name";
    h.method = "AMethod";
    h.timeout_ms = 99999;
    size_t len;
    uint8_t *buf = tw_pack(&h, &len);
    size_t failures = 0;
    for (size_t cut = 1; cut < len; cut++) {
        kp_header *out;
        kp_arena_reset(&arena);
        enum kp_err err = kp_wire_decode(&arena, buf, cut, 65536, &out);
        cr_assert(err == KP_OK || err == KP_EBADHEADER);
        failures += err != KP_OK;
    }
    /* Cuts inside a field must fail; cuts between fields decode a prefix. */
    cr_assert_gt(failures, len / 2);
    free(buf);
}

Test(wire, oversized_header_is_refused_before_decoding)
{
    kp_header h = tw_header(KELPIE__V1__KIND__REQUEST, 77);
    char method[2000];
    memset(method, 'm', sizeof method - 1);
    method[sizeof method - 1] = '\0';
    h.service = "svc";
    h.method = method;
    size_t len;
    uint8_t *buf = tw_pack(&h, &len);
    kp_header *out;
    cr_assert_eq(kp_wire_decode(&arena, buf, len, 1024, &out), KP_EOVERSIZED);
    cr_assert_null(out);
    cr_assert_eq(kp_wire_decode(&arena, buf, len, len, &out), KP_OK);
    cr_assert_eq(kp_err_code(KP_EOVERSIZED), KELPIE__V1__CODE__RESOURCE_EXHAUSTED);
    /* The id can still be read for the ERROR. */
    cr_assert_eq(kp_wire_peek_request_id(buf, len), 77);
    free(buf);
}

Test(wire, peek_request_id_walks_fields_and_gives_up_on_garbage)
{
    kp_header h = tw_header(KELPIE__V1__KIND__REPLY, 0x123456789abcull);
    h.service = "before-and-after";
    size_t len;
    uint8_t *buf = tw_pack(&h, &len);
    cr_assert_eq(kp_wire_peek_request_id(buf, len), 0x123456789abcull);
    cr_assert_eq(kp_wire_peek_request_id(buf, 3), 0, "cut inside the id");
    free(buf);
    cr_assert_eq(kp_wire_peek_request_id("\xff\xff\xff", 3), 0);
    cr_assert_eq(kp_wire_peek_request_id("", 0), 0);
    /* Field 3 after a string field. */
    cr_assert_eq(kp_wire_peek_request_id("\x22\x01x\x18\x07", 5), 7);
}

Test(wire, many_metadata_entries_spill_out_of_the_arena_block)
{
    enum { N = 2000 };
    static Kelpie__V1__Header__MetadataEntry entries[N];
    static Kelpie__V1__Header__MetadataEntry *ptrs[N];
    for (int i = 0; i < N; i++) {
        kelpie__v1__header__metadata_entry__init(&entries[i]);
        entries[i].key = "k";
        ptrs[i] = &entries[i];
    }
    kp_header h = tw_header(KELPIE__V1__KIND__HEARTBEAT, 0);
    h.metadata = ptrs;
    h.n_metadata = N;
    size_t len;
    uint8_t *buf = tw_pack(&h, &len);
    kp_header *out;
    cr_assert_eq(kp_wire_parse(&arena, buf, len, 65536, KP_FROM_CLIENT, &out), KP_OK);
    cr_assert_eq(out->n_metadata, N);
    cr_assert_not_null(arena.spill, "4 KiB block cannot hold 2000 entries");
    kp_arena_reset(&arena);
    cr_assert_null(arena.spill);
    cr_assert_eq(arena.used, 0);
    free(buf);
}

Test(wire, unknown_fields_survive_a_re_encode)
{
    /* Field 99 (varint 5) appended to a valid header: a newer minor version. */
    kp_header h = tw_header(KELPIE__V1__KIND__REQUEST, 1);
    h.service = "svc";
    size_t len;
    uint8_t *buf = tw_pack(&h, &len);
    uint8_t *ext = malloc(len + 3);
    memcpy(ext, buf, len);
    ext[len] = 0x98; /* (99 << 3) | 0, varint-encoded: 0x98 0x06 */
    ext[len + 1] = 0x06;
    ext[len + 2] = 0x05;
    kp_header *out;
    cr_assert_eq(kp_wire_parse(&arena, ext, len + 3, 65536, KP_FROM_CLIENT, &out), KP_OK);
    out->request_id = 2;
    zmq_msg_t msg;
    cr_assert_eq(kp_wire_encode(out, &msg), KP_OK);
    cr_assert_eq(zmq_msg_size(&msg), len + 3, "the unknown field was dropped");
    zmq_msg_close(&msg);
    free(buf);
    free(ext);
}

Test(wire, error_table_is_complete)
{
    for (int e = 0; e < KP_ERR_COUNT; e++) {
        cr_assert_neq(strcmp(kp_strerror((enum kp_err)e), "unknown error"), 0);
        cr_assert_neq(strcmp(kp_err_name((enum kp_err)e), "EUNKNOWN"), 0);
    }
    cr_assert_str_eq(kp_err_name(KP_EBADHEADER), "EBADHEADER");
    cr_assert_str_eq(kp_strerror((enum kp_err)1000), "unknown error");
    cr_assert_eq(kp_err_code((enum kp_err)1000), KELPIE__V1__CODE__INTERNAL);
    cr_assert_eq(kp_err_code(KP_ECANCELLED), KELPIE__V1__CODE__CANCELLED);
    cr_assert_eq(kp_err_code(KP_EWORKERLOST), KELPIE__V1__CODE__UNAVAILABLE);
}

Test(wire, field_number_zero_is_refused_even_in_a_long_tag)
{
    /* Found by the fuzzer: protobuf-c keeps field 0 spelled 0x80 0x00 as an
     * unknown field and re-encodes it as 0x00, which nobody can decode. */
    kp_header *out;
    cr_assert_eq(kp_wire_decode(&arena, "\x80\x00\xf6\x04", 4, 65536, &out), KP_EBADHEADER);
    cr_assert_eq(kp_wire_decode(&arena, "\x08\x01\x80\x00\x05", 5, 65536, &out), KP_EBADHEADER);
    /* Inside a metadata entry too. */
    cr_assert_eq(kp_wire_decode(&arena, "\x08\x01\x5a\x05\x0a\x00\x80\x00\x00", 9, 65536, &out),
                 KP_EBADHEADER);
    /* Inside WorkerStats (field 32), which the first check missed: CI's
     * fuzz run found it. */
    cr_assert_eq(kp_wire_decode(&arena, "\x82\x82\x00\x03\x82\x00\x00", 7, 65536, &out),
                 KP_EBADHEADER);
    /* The same submessage, well formed, still decodes. */
    cr_assert_eq(kp_wire_decode(&arena, "\x82\x02\x02\x10\x07", 5, 65536, &out), KP_OK);
    cr_assert_not_null(out->worker_stats);
    cr_assert_eq(out->worker_stats->pid, 7);
}

Test(wire, a_nul_byte_in_a_string_is_refused_in_bytes_it_passes)
{
    /* protobuf-c drops a string's length at its first NUL: "k\0a" and
     * "k\0b" were one idempotency key, "q\0x" the queue "q". */
    kp_header *out;
    /* idempotency_key (19) "k\0a" */
    cr_assert_eq(kp_wire_decode(&arena,
                                "\x08\x01\x9a\x01\x03k\x00"
                                "a",
                                8, 65536, &out),
                 KP_EBADHEADER);
    /* service (4) "q\0x", after a request_id */
    cr_assert_eq(kp_wire_decode(&arena, "\x18\x07\x22\x03q\x00x", 7, 65536, &out), KP_EBADHEADER);
    /* services (10), repeated: the second one */
    cr_assert_eq(kp_wire_decode(&arena,
                                "\x52\x01"
                                "a\x52\x02\x00"
                                "b",
                                7, 65536, &out),
                 KP_EBADHEADER);
    /* a metadata key (11 { 1: "a\0" 2: "v" }) */
    cr_assert_eq(kp_wire_decode(&arena, "\x5a\x07\x0a\x02\x61\x00\x12\x01v", 9, 65536, &out),
                 KP_EBADHEADER);
    /* WorkerStats.host (32 { 1: "h\0" }) */
    cr_assert_eq(kp_wire_decode(&arena, "\x82\x02\x04\x0a\x02h\x00", 7, 65536, &out),
                 KP_EBADHEADER);
    /* The free-text message (8) is cut at its NUL, not refused: an ERROR
     * or a failed job's RESULT carrying an exception's text still lands. */
    cr_assert_eq(kp_wire_decode(&arena,
                                "\x08\x01\x42\x03"
                                "a\x00"
                                "b",
                                7, 65536, &out),
                 KP_OK);
    cr_assert_str_eq(out->message, "a");
    /* A metadata value is bytes: NULs are data. */
    cr_assert_eq(kp_wire_decode(&arena, "\x5a\x07\x0a\x01k\x12\x02\x00\x00", 9, 65536, &out),
                 KP_OK);
    cr_assert_eq(out->n_metadata, 1);
    cr_assert_eq(out->metadata[0]->value.len, 2);
    /* Zero bytes outside strings: broker_id (fixed64, 23) and an empty
     * services entry. */
    cr_assert_eq(
        kp_wire_decode(&arena, "\xb9\x01\x01\x00\x00\x00\x00\x00\x00\x00\x52\x00", 12, 65536, &out),
        KP_OK);
    cr_assert_eq(out->broker_id, 1);
    cr_assert_eq(out->n_services, 1);
}

Test(wire, strings_must_be_utf8)
{
    static const char *const bad[] = {
        "\xff",         "caf\xc3",
        "\xc0\xaf",                                         /* overlong '/' */
        "\xed\xa0\x80", /* surrogate */ "\xf4\x90\x80\x80", /* > U+10FFFF */
        "\x80",         "\xe2\x82",
    };
    static const char *const good[] = {"echo", "caf\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x90\xb4",
                                       ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kp_header h = tw_header(KELPIE__V1__KIND__REQUEST, 1);
        h.service = (char *)bad[i];
        cr_assert_eq(tw_parse(&h, KP_FROM_CLIENT), KP_EBADHEADER, "service #%zu", i);
        h.service = "svc";
        h.method = (char *)bad[i];
        cr_assert_eq(tw_parse(&h, KP_FROM_CLIENT), KP_EBADHEADER, "method #%zu", i);
        kp_header r = tw_header(KELPIE__V1__KIND__READY, 0);
        char *services[] = {"ok", (char *)bad[i]};
        r.services = services;
        r.n_services = 2;
        cr_assert_eq(tw_parse(&r, KP_FROM_WORKER), KP_EBADHEADER, "services #%zu", i);
        /* Strings inside submessages too: a heartbeat's WorkerStats host is
         * shown to admin clients. */
        kp_header hb = tw_header(KELPIE__V1__KIND__HEARTBEAT, 0);
        Kelpie__V1__WorkerStats ws = KELPIE__V1__WORKER_STATS__INIT;
        ws.host = (char *)bad[i];
        hb.worker_stats = &ws;
        cr_assert_eq(tw_parse(&hb, KP_FROM_WORKER), KP_EBADHEADER, "worker_stats.host #%zu", i);
    }
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        kp_header h = tw_header(KELPIE__V1__KIND__REQUEST, 1);
        h.service = "svc";
        h.method = (char *)good[i];
        cr_assert_eq(tw_parse(&h, KP_FROM_CLIENT), KP_OK, "good #%zu", i);
    }
}

/* The hand-written codec (wire.c) against protobuf-c: random headers with
 * every field, and damaged encodings of them. */

static uint64_t tw_rng = 0x9e3779b97f4a7c15ull;

static uint64_t tw_rand(void)
{
    tw_rng ^= tw_rng << 13;
    tw_rng ^= tw_rng >> 7;
    tw_rng ^= tw_rng << 17;
    return tw_rng;
}

/* A value of every size class a varint can take: zero, small, 32 and 64 bit. */
static uint64_t tw_rand_value(void)
{
    switch (tw_rand() % 5) {
    case 0:
        return 0;
    case 1:
        return tw_rand() % 200;
    case 2:
        return (uint32_t)tw_rand();
    case 3:
        return UINT64_MAX - tw_rand() % 3;
    default:
        return tw_rand();
    }
}

static const char *const tw_strings[] = {
    "",
    "echo",
    "Echo",
    "caf\xc3\xa9",
    "\xff",
    "traceparent",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "a long string of more than one hundred and twenty-seven bytes so that its length takes two "
    "bytes of varint, which is the case the hand codec must also get right",
};

static char *tw_rand_string(void)
{
    return (char *)tw_strings[tw_rand() % (sizeof tw_strings / sizeof *tw_strings)];
}

/* Fills h with random fields, each present about half the time; the arrays
 * it points into are the caller's. worker_stats only when stats is true. */
struct tw_store {
    Kelpie__V1__Header__MetadataEntry entries[4];
    Kelpie__V1__Header__MetadataEntry *pentries[4];
    char *strs[3][3];
    uint32_t sizes[4];
    Kelpie__V1__WorkerStats ws;
};

static void tw_rand_header(kp_header *h, struct tw_store *st, bool stats)
{
    *h = (kp_header)KELPIE__V1__HEADER__INIT;
#define MAYBE(stmt)                                                                                \
    do {                                                                                           \
        if (tw_rand() % 2)                                                                         \
            stmt;                                                                                  \
    } while (0)
    MAYBE(h->version = (uint32_t)tw_rand_value());
    MAYBE(h->kind = (kp_kind)(tw_rand() % 30));
    MAYBE(h->request_id = tw_rand_value());
    MAYBE(h->service = tw_rand_string());
    MAYBE(h->method = tw_rand_string());
    MAYBE(h->timeout_ms = tw_rand_value());
    MAYBE(h->code = (Kelpie__V1__Code)(tw_rand() % 20));
    MAYBE(h->message = tw_rand_string());
    MAYBE(h->credits = (uint32_t)tw_rand_value());
    MAYBE(h->flags = (uint32_t)tw_rand_value());
    MAYBE(h->sequence = tw_rand_value());
    MAYBE(h->heartbeat_ms = (uint32_t)tw_rand_value());
    MAYBE(h->name = tw_rand_string());
    MAYBE(h->job_id = tw_rand_string());
    MAYBE(h->attempt = (uint32_t)tw_rand_value());
    MAYBE(h->max_attempts = (uint32_t)tw_rand_value());
    MAYBE(h->idempotency_key = tw_rand_string());
    MAYBE(h->priority = (int32_t)tw_rand_value());
    MAYBE(h->delay_ms = tw_rand_value());
    MAYBE(h->stream = tw_rand_string());
    MAYBE(h->broker_id = tw_rand_value());
    MAYBE(h->max_message_size = tw_rand_value());
    MAYBE(h->backoff_ms = tw_rand_value());
    MAYBE(h->batch_max = (uint32_t)tw_rand_value());
    if (tw_rand() % 4 == 0) {
        static const float progress[] = {0.5f, -0.0f, 1.0f, 1e-30f};
        h->progress = progress[tw_rand() % 4];
    }
    char **lists[3] = {NULL, NULL, NULL};
    size_t counts[3] = {0, 0, 0};
    for (int l = 0; l < 3; l++) {
        if (tw_rand() % 4 == 0) {
            counts[l] = 1 + tw_rand() % 3;
            for (size_t i = 0; i < counts[l]; i++)
                st->strs[l][i] = tw_rand_string();
            lists[l] = st->strs[l];
        }
    }
    h->services = lists[0], h->n_services = counts[0];
    h->methods = lists[1], h->n_methods = counts[1];
    h->queues = lists[2], h->n_queues = counts[2];
    if (tw_rand() % 2) {
        h->n_metadata = 1 + tw_rand() % 4;
        for (size_t i = 0; i < h->n_metadata; i++) {
            Kelpie__V1__Header__MetadataEntry *e = &st->entries[i];
            *e = (Kelpie__V1__Header__MetadataEntry)KELPIE__V1__HEADER__METADATA_ENTRY__INIT;
            e->key = tw_rand_string();
            const char *v = tw_rand_string();
            e->value.len = strlen(v);
            e->value.data = (uint8_t *)v;
            st->pentries[i] = e;
        }
        h->metadata = st->pentries;
    }
    if (tw_rand() % 4 == 0) {
        h->n_batch_sizes = 1 + tw_rand() % 4;
        for (size_t i = 0; i < h->n_batch_sizes; i++)
            st->sizes[i] = (uint32_t)tw_rand_value();
        h->batch_sizes = st->sizes;
    }
    if (stats && tw_rand() % 4 == 0) {
        st->ws = (Kelpie__V1__WorkerStats)KELPIE__V1__WORKER_STATS__INIT;
        st->ws.host = tw_rand_string();
        st->ws.pid = (uint32_t)tw_rand_value();
        h->worker_stats = &st->ws;
    }
#undef MAYBE
}

Test(wire, hand_encoding_writes_protobuf_c_bytes)
{
    for (int i = 0; i < 20000; i++) {
        kp_header h;
        struct tw_store st;
        tw_rand_header(&h, &st, true);
        size_t len;
        uint8_t *want = tw_pack(&h, &len);
        cr_assert_eq(kp_wire_pack_into(&h, NULL, 0), len, "header #%d", i);
        /* Too small by one byte and by more: the size, nothing written past
         * the room given; with room enough, the bytes. */
        uint8_t *got = malloc(len + 16);
        for (size_t cap = len > 40 ? len - 40 : 0; cap <= len + 1; cap++) {
            memset(got, 0xa5, len + 16);
            cr_assert_eq(kp_wire_pack_into(&h, got, cap), len, "header #%d, room %zu", i, cap);
            for (size_t k = cap; k < len + 16; k++)
                cr_assert_eq(got[k], 0xa5, "header #%d wrote past its room %zu", i, cap);
            if (cap >= len)
                cr_assert_eq(memcmp(got, want, len), 0, "header #%d", i);
        }
        free(got);
        free(want);
    }
}

/* Decodes buf both ways and checks they agree: the same error, or headers
 * that protobuf-c encodes into the same bytes. */
static void tw_decode_agrees(const uint8_t *buf, size_t len, const char *what, int i)
{
    static struct kp_arena other;
    if (other.block == NULL)
        kp_arena_init(&other, 4096);
    kp_arena_reset(&arena);
    kp_arena_reset(&other);
    kp_header *fast, *slow;
    enum kp_err ef = kp_wire_decode(&arena, buf, len, 65536, &fast);
    enum kp_err es = kp_wire_decode_generic(&other, buf, len, 65536, &slow);
    cr_assert_eq(ef, es, "%s #%d: %d against protobuf-c's %d", what, i, ef, es);
    if (ef != KP_OK)
        return;
    size_t nf, ns;
    uint8_t *pf = tw_pack(fast, &nf), *ps = tw_pack(slow, &ns);
    cr_assert(nf == ns && memcmp(pf, ps, nf) == 0, "%s #%d decodes differently", what, i);
    /* What pack cannot tell apart: a string field absent or empty. */
    cr_assert_str_eq(fast->service, slow->service, "%s #%d", what, i);
    cr_assert_str_eq(fast->method, slow->method, "%s #%d", what, i);
    cr_assert_eq(fast->n_metadata, slow->n_metadata, "%s #%d", what, i);
    for (size_t k = 0; k < fast->n_metadata; k++) {
        cr_assert_str_eq(fast->metadata[k]->key, slow->metadata[k]->key, "%s #%d", what, i);
        cr_assert_eq(fast->metadata[k]->value.data == NULL, slow->metadata[k]->value.data == NULL,
                     "%s #%d", what, i);
    }
    free(pf);
    free(ps);
}

Test(wire, hand_decoding_agrees_with_protobuf_c)
{
    static uint8_t buf[16384];
    for (int i = 0; i < 20000; i++) {
        kp_header h;
        struct tw_store st;
        tw_rand_header(&h, &st, tw_rand() % 8 == 0);
        size_t len;
        uint8_t *enc = tw_pack(&h, &len);
        cr_assert_lt(len, sizeof buf / 2);
        memcpy(buf, enc, len);
        free(enc);
        tw_decode_agrees(buf, len, "valid", i);
        /* The same field twice (the last one wins), or a field appended. */
        size_t n = len;
        if (len && tw_rand() % 2) {
            size_t from = tw_rand() % len, cut = tw_rand() % (len - from + 1);
            memcpy(buf + n, buf + from, cut);
            n += cut;
        } else {
            static const uint8_t extra[][6] = {
                {2, 0x08, 0x02},       {3, 0x88, 0x00, 0x05}, {2, 0x18, 0x07},
                {3, 0xa8, 0x01, 0x7f}, {2, 0x22, 0x00},       {5, 0x5a, 0x03, 0x0a, 0x01, 0x61},
                {2, 0x5a, 0x00},       {3, 0x5a, 0x01, 0x08}, {4, 0x5a, 0x02, 0x12, 0x00},
                {3, 0xf8, 0x07, 0x01},
            };
            const uint8_t *e = extra[tw_rand() % (sizeof extra / sizeof *extra)];
            memcpy(buf + n, e + 1, e[0]);
            n += e[0];
        }
        tw_decode_agrees(buf, n, "repeated", i);
        /* Damage: a byte changed, or the frame cut short. */
        if (n) {
            memcpy(buf + n, buf, n);
            buf[n + tw_rand() % n] = (uint8_t)tw_rand();
            tw_decode_agrees(buf + n, n, "damaged", i);
            tw_decode_agrees(buf, tw_rand() % n, "truncated", i);
        }
    }
}

Test(wire, long_varints_decode_as_protobuf_c_reads_them)
{
    /* uint32 fields keep the low 32 bits; a tenth byte over 1; a varint of
     * eleven bytes; a negative priority; a length in six bytes. */
    static const struct {
        size_t len;
        const char *bytes;
    } cases[] = {
        {11, "\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"},
        {11, "\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"},
        {11, "\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f"},
        {12, "\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"},
        {12, "\xa0\x01\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01"},
        {8, "\x22\x81\x80\x80\x80\x80\x00\x61"},
        {7, "\x22\x81\x80\x80\x80\x00\x61"},
        {6, "\x08\x80\x80\x80\x80\x10"},
        {3, "\x10\x80\x01"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        tw_decode_agrees((const uint8_t *)cases[i].bytes, cases[i].len, "case", (int)i);
}
