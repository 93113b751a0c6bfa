/*
 * wire.c: packing and unpacking KLP/1 messages on DEALER sockets.
 *
 * The header is packed straight into the data of a zmq_msg_t, so sending
 * costs one protobuf pack and no extra copy; a single payload frame is
 * received into a zmq_msg_t and exposed in place. Headers are decoded into a
 * caller-provided arena (kpc_arena): protobuf-c otherwise makes one malloc
 * per string and per struct, which showed up in the benchmark's profile.
 */
#include "wire.h"

#include <errno.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void *arena_alloc(void *data, size_t size)
{
    kpc_arena *a = data;
    size_t aligned = (size + alignof(max_align_t) - 1) & ~(alignof(max_align_t) - 1);
    if (aligned <= KPC_ARENA_SIZE - a->used) {
        void *p = a->buf + a->used;
        a->used += aligned;
        return p;
    }
    return malloc(size);
}

static void arena_free(void *data, void *p)
{
    kpc_arena *a = data;
    uintptr_t at = (uintptr_t)p, lo = (uintptr_t)a->buf;
    if (at < lo || at >= lo + KPC_ARENA_SIZE)
        free(p); /* spilled to malloc */
}

void kpc_arena_init(kpc_arena *arena)
{
    arena->allocator.alloc = arena_alloc;
    arena->allocator.free = arena_free;
    arena->allocator.allocator_data = arena;
    arena->used = 0;
}

void kpc_header_free(Kelpie__V1__Header *header, kpc_arena *arena)
{
    if (header)
        kelpie__v1__header__free_unpacked(header, arena ? &arena->allocator : NULL);
}

char *kpc_strndup(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        if (n)
            memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

kelpie_status kpc_wire_send(void *sock, Kelpie__V1__Header *header, const void *payload, size_t len,
                            int zmq_flags)
{
    header->version = KELPIE__V1__VERSION__VERSION_1;
    size_t size = kelpie__v1__header__get_packed_size(header);
    zmq_msg_t frame;
    if (zmq_msg_init_size(&frame, size) != 0)
        return KELPIE_ERR_NOMEM;
    kelpie__v1__header__pack(header, zmq_msg_data(&frame));
    if (zmq_msg_send(&frame, sock, zmq_flags | (len > 0 ? ZMQ_SNDMORE : 0)) < 0) {
        int err = zmq_errno();
        zmq_msg_close(&frame);
        return err == EAGAIN ? KELPIE_ERR_BUSY : KELPIE_ERR_ZMQ;
    }
    /* Once the first frame is queued, libzmq accepts the rest of the
     * message: multipart messages are atomic. */
    if (len > 0 && zmq_send(sock, payload, len, 0) < 0)
        return KELPIE_ERR_ZMQ;
    return KELPIE_OK;
}

kelpie_status kpc_wire_check(Kelpie__V1__Header *header, size_t len, uint64_t limit,
                             const char *what, char *why, size_t why_len)
{
    header->version = KELPIE__V1__VERSION__VERSION_1;
    uint64_t size = (uint64_t)kelpie__v1__header__get_packed_size(header) + len;
    if (size <= limit)
        return KELPIE_OK;
    if (why)
        snprintf(why, why_len, "%s of %llu bytes exceeds the broker's limit of %llu", what,
                 (unsigned long long)size, (unsigned long long)limit);
    return KELPIE_RESOURCE_EXHAUSTED;
}

/* Appends a frame to msg's joined buffer. */
static kelpie_status wire_join(kpc_msg *msg, const void *data, size_t len)
{
    void *grown = realloc(msg->joined, msg->len + len);
    if (!grown && msg->len + len > 0)
        return KELPIE_ERR_NOMEM;
    msg->joined = grown;
    if (len)
        memcpy((char *)msg->joined + msg->len, data, len);
    msg->len += len;
    msg->data = msg->joined;
    return KELPIE_OK;
}

/* Drops the remaining frames of a partly read message. */
static void wire_drain(void *sock)
{
    int more = 1;
    size_t size = sizeof more;
    while (zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &size) == 0 && more) {
        zmq_msg_t frame;
        zmq_msg_init(&frame);
        if (zmq_msg_recv(&frame, sock, 0) < 0) {
            zmq_msg_close(&frame);
            return;
        }
        zmq_msg_close(&frame);
    }
}

kelpie_status kpc_wire_recv(void *sock, kpc_msg *msg, int zmq_flags, kpc_arena *arena)
{
    memset(msg, 0, sizeof *msg);
    msg->arena = arena;
    if (arena)
        kpc_arena_init(arena);
    zmq_msg_t head;
    zmq_msg_init(&head);
    if (zmq_msg_recv(&head, sock, zmq_flags) < 0) {
        int err = zmq_errno();
        zmq_msg_close(&head);
        return err == EAGAIN ? KELPIE_ERR_TIMEOUT : KELPIE_ERR_ZMQ;
    }
    msg->header = kelpie__v1__header__unpack(arena ? &arena->allocator : NULL, zmq_msg_size(&head),
                                             zmq_msg_data(&head));
    int more = zmq_msg_more(&head);
    zmq_msg_close(&head);

    kelpie_status rc = KELPIE_OK;
    while (more) {
        zmq_msg_t frame;
        zmq_msg_init(&frame);
        if (zmq_msg_recv(&frame, sock, 0) < 0) {
            zmq_msg_close(&frame);
            return KELPIE_ERR_ZMQ;
        }
        more = zmq_msg_more(&frame);
        if (!msg->has_frame && !msg->joined) {
            /* First payload frame: keep it in place. */
            zmq_msg_init(&msg->frame);
            zmq_msg_move(&msg->frame, &frame);
            zmq_msg_close(&frame);
            msg->has_frame = 1;
            msg->len = zmq_msg_size(&msg->frame);
            msg->data = msg->len ? zmq_msg_data(&msg->frame) : NULL;
            continue;
        }
        if (msg->has_frame) {
            /* A second frame: switch to a joined copy of all of them. */
            size_t first = msg->len;
            msg->len = 0;
            rc = wire_join(msg, zmq_msg_data(&msg->frame), first);
            zmq_msg_close(&msg->frame);
            msg->has_frame = 0;
        }
        if (rc == KELPIE_OK)
            rc = wire_join(msg, zmq_msg_data(&frame), zmq_msg_size(&frame));
        zmq_msg_close(&frame);
        if (rc != KELPIE_OK) {
            wire_drain(sock);
            return rc;
        }
    }
    if (msg->len == 0)
        msg->data = NULL;
    return KELPIE_OK;
}

void kpc_msg_fini(kpc_msg *msg)
{
    kpc_header_free(msg->header, msg->arena);
    if (msg->has_frame)
        zmq_msg_close(&msg->frame);
    free(msg->joined);
    memset(msg, 0, sizeof *msg);
}
