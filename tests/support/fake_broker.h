/* fake_broker: a ROUTER that plays kelpied's part to a C client or worker,
 * for the tests a real broker cannot provoke on cue (a scripted sequence, a
 * hostile peer). Its functions assert with Criterion, so only Criterion
 * tests link them. */
#ifndef KELPIE_FAKE_BROKER_H
#define KELPIE_FAKE_BROKER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#include "kelpie/v1/header.pb-c.h"

typedef struct fake {
    void *ctx;
    void *sock;        /* ROUTER bound on a free port of 127.0.0.1 */
    char endpoint[64]; /* where it listens */
    zmq_msg_t rid;     /* routing id of the last peer heard */
    bool has_rid;
} fake;

void fake_open(fake *f);
void fake_close(fake *f);

/* Receives one message within timeout_ms; its header (the caller frees it
 * with kelpie__v1__header__free_unpacked) and, into payload/plen when
 * given, its first payload frame (payload must hold it). NULL on timeout. */
Kelpie__V1__Header *fake_recv(fake *f, int timeout_ms, char *payload, size_t *plen);

/* Receives until a message of kind arrives (skipping other kinds), within
 * timeout_ms; payload/plen as fake_recv. */
Kelpie__V1__Header *fake_expect(fake *f, Kelpie__V1__Kind kind, int timeout_ms, char *payload,
                                size_t *plen);

/* Sends n raw frames (after the routing id) to the last peer heard. */
void fake_frames(fake *f, size_t n, const void *const *frames, const size_t *lens);

/* Sends h (its version set here) and an optional payload to the last peer. */
void fake_send(fake *f, Kelpie__V1__Header *h, const void *payload, size_t len);

/* A HEARTBEAT with a broker id and a message size limit: the welcome. */
void fake_heartbeat(fake *f, uint64_t broker_id, uint64_t max_message_size);

/* Waits (5 s at most, asserting) for a worker's READY and welcomes it as
 * broker broker_id with a 16 MiB limit. */
void fake_welcome(fake *f, uint64_t broker_id);

#endif
