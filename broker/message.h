/* message: the message being handled, received whole and parsed.
 *
 * Owns the receive array (a message's frames as ZeroMQ delivered them:
 * [routing id] header payload...), its size accounting, and the arena its
 * header decodes into. It sits just above wire.c: kp_message_parse() applies
 * the frame-level rules (frame count, total size) and then the codec's, so
 * the frontend and backend handlers call down into it and never back into
 * the loop. The loop fills it (kp_message_recv, or kp_message_load when a
 * test or the fuzzer injects frames) and empties it after each handler
 * (kp_message_release); handlers move frames out of it, never close them.
 */
#ifndef KP_MESSAGE_H
#define KP_MESSAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#include "error.h"
#include "wire.h"

/* Most frames in one message (routing id + header + payload); more is refused. */
#define KP_MAX_FRAMES 64

struct kp_message {
    struct kp_arena arena;           /* decoded headers; reset per message */
    zmq_msg_t frames[KP_MAX_FRAMES]; /* received frames, [rid] header payload */
    size_t nframes;                  /* frames received */
    uint64_t size;                   /* bytes in all frames received */
    bool too_many;                   /* frames beyond KP_MAX_FRAMES were discarded */
};

/* Sets up an empty message with an arena block of arena_size bytes. */
void kp_message_init(struct kp_message *m, size_t arena_size);

/* Closes every frame and frees the arena; init again before reuse. */
void kp_message_fini(struct kp_message *m);

/* Reads one whole message from sock into m without waiting (m must be
 * empty); returns false if none was ready. Frames past KP_MAX_FRAMES are
 * read and discarded, and recorded in too_many. */
bool kp_message_recv(struct kp_message *m, void *sock);

/* Moves frames[0..n) into m (m must be empty) as if they had been
 * received: frames past KP_MAX_FRAMES are counted and left to the caller. */
void kp_message_load(struct kp_message *m, zmq_msg_t *frames, size_t n);

/* Closes the frames still in m (handlers moved out those they kept) and
 * empties it. The arena is not reset. */
void kp_message_release(struct kp_message *m);

/* Validates m as coming from dir with its header at hdr_index: frame count,
 * total size (max_message; the routing id, added by the broker's ROUTER,
 * does not count), header decode (max_header) and check. Returns KP_OK with
 * *h set, or the reason; then *h is set if the header decoded, and
 * *request_id is the id to echo in the ERROR (read from the header, or
 * peeked from an undecodable/oversized one, or 0). */
enum kp_err kp_message_parse(struct kp_message *m, enum kp_dir dir, size_t hdr_index,
                             size_t max_header, uint64_t max_message, kp_header **h,
                             uint64_t *request_id);

#endif
