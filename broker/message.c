/* message: receiving and parsing the message being handled; see message.h. */
#include "message.h"
#include "log.h"

void kp_message_init(struct kp_message *m, size_t arena_size)
{
    kp_arena_init(&m->arena, arena_size);
    for (size_t i = 0; i < KP_MAX_FRAMES; i++)
        zmq_msg_init(&m->frames[i]);
    m->nframes = 0;
    m->size = 0;
    m->too_many = false;
}

void kp_message_fini(struct kp_message *m)
{
    for (size_t i = 0; i < KP_MAX_FRAMES; i++)
        zmq_msg_close(&m->frames[i]);
    kp_arena_fini(&m->arena);
}

bool kp_message_recv(struct kp_message *m, void *sock)
{
    m->nframes = 0;
    m->size = 0;
    m->too_many = false;
    if (zmq_msg_recv(&m->frames[0], sock, ZMQ_DONTWAIT) < 0)
        return false;
    m->nframes = 1;
    m->size = zmq_msg_size(&m->frames[0]);
    bool more = zmq_msg_more(&m->frames[0]);
    while (more) {
        zmq_msg_t *f;
        zmq_msg_t scratch;
        if (m->nframes < KP_MAX_FRAMES) {
            f = &m->frames[m->nframes];
        } else {
            zmq_msg_init(&scratch);
            f = &scratch;
            m->too_many = true;
        }
        /* The rest of a multipart message is already here: this cannot block. */
        if (zmq_msg_recv(f, sock, 0) < 0) {
            if (f == &scratch)
                zmq_msg_close(&scratch);
            break;
        }
        m->size += zmq_msg_size(f);
        more = zmq_msg_more(f);
        if (f == &scratch)
            zmq_msg_close(&scratch);
        else
            m->nframes++;
    }
    return true;
}

void kp_message_load(struct kp_message *m, zmq_msg_t *frames, size_t n)
{
    m->nframes = 0;
    m->size = 0;
    m->too_many = n > KP_MAX_FRAMES;
    for (size_t i = 0; i < n; i++) {
        m->size += zmq_msg_size(&frames[i]);
        if (i < KP_MAX_FRAMES) {
            zmq_msg_move(&m->frames[i], &frames[i]);
            m->nframes++;
        }
    }
}

void kp_message_release(struct kp_message *m)
{
    kp_log_set_header(NULL);
    for (size_t i = 0; i < m->nframes; i++) {
        zmq_msg_close(&m->frames[i]);
        zmq_msg_init(&m->frames[i]);
    }
    m->nframes = 0;
}

enum kp_err kp_message_parse(struct kp_message *m, enum kp_dir dir, size_t hdr_index,
                             size_t max_header, uint64_t max_message, kp_header **h,
                             uint64_t *request_id)
{
    *h = NULL;
    *request_id = 0;
    if (m->nframes <= hdr_index)
        return KP_ENOHEADER;
    zmq_msg_t *f = &m->frames[hdr_index];
    enum kp_err err =
        kp_wire_parse(&m->arena, zmq_msg_data(f), zmq_msg_size(f), max_header, dir, h);
    if (*h) {
        *request_id = (*h)->request_id;
        kp_log_set_header(*h); /* its ids go on the lines logged while it is handled */
    } else if (err == KP_EOVERSIZED || err == KP_EBADHEADER)
        *request_id = kp_wire_peek_request_id(zmq_msg_data(f), zmq_msg_size(f));
    /* Frame-level problems outrank what the header says. */
    if (m->too_many)
        return KP_ETOOMANYFRAMES;
    /* The limit is on what the peer sent: its routing id is the broker's. */
    uint64_t size = m->size - (hdr_index > 0 ? zmq_msg_size(&m->frames[0]) : 0);
    if (size > max_message)
        return KP_EOVERSIZED;
    return err;
}
