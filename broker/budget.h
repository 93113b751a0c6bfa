/* budget: the bytes the broker has handed to libzmq and libzmq still holds,
 * per peer and broker-wide.
 *
 * ZeroMQ bounds a pipe in messages (ZMQ_SNDHWM), not in bytes, and never
 * tells the sender when a message has left. But the broker builds every
 * header frame itself, so it makes that frame with zmq_msg_init_data and a
 * free callback that carries the whole message's size: libzmq closes the
 * header frame, and so runs the callback, when its encoder has taken the
 * frame out of the pipe (libzmq 4.3.4, encoder_base_t::encode, on the I/O
 * thread), when the pipe is dropped with its peer, or on the loop thread when
 * a send fails. The payload frames behind that header leave right after it,
 * so "queued" is what sits in the pipe, give or take the one message the
 * encoder is writing.
 *
 * Because the callback runs on another thread the counters are atomics, and
 * because it can run after the peer is forgotten an account is reference
 * counted: the peer holds one reference and every queued message one more; a
 * peer's account holds one on the broker-wide account it adds to. Nothing
 * here takes a lock; the loop thread reads the counters with relaxed loads
 * (a few bytes of staleness only moves a decision by one message).
 */
#ifndef KP_BUDGET_H
#define KP_BUDGET_H

#include <stdint.h>
#include <zmq.h>

#include "error.h"
#include "wire.h"

struct kp_budget;

/* Makes an account with no bytes queued and one reference (the caller's).
 * total, if not NULL, is the broker-wide account every byte charged here is
 * also charged to; the new account holds a reference on it. Cannot fail. */
struct kp_budget *kp_budget_new(struct kp_budget *total);

/* Drops the caller's reference; the account is freed once no queued message
 * refers to it either. *bp = NULL. Idempotent. Callable from any thread. */
void kp_budget_release(struct kp_budget **bp);

/* Bytes queued on this account now (relaxed; for decisions and Stats). */
uint64_t kp_budget_queued(const struct kp_budget *b);

/* Encodes h into *out, a header frame that charges the message it heads
 * (size bytes of other frames, plus its own) to acct (and its total) until
 * libzmq frees the frame.
 * The charge is made now; closing *out unsent gives it back. Returns KP_OK,
 * or KP_ESYS if libzmq could not make the frame (nothing charged). */
enum kp_err kp_budget_frame(struct kp_budget *acct, const kp_header *h, uint64_t size,
                            zmq_msg_t *out);

/* A payload frame sent to many peers: a job's events and result to its
 * watchers (jobs.c). Each send is a zmq_msg_copy of one buffer, yet each
 * header frame charges the payload again, so N watchers that do not read
 * would fill the broker-wide account with N times bytes that exist once.
 * A share charges its bytes to the total once, for as long as any copy of
 * them lives; each copy made by kp_budget_share_copy gives back to the total
 * the payload bytes the send that carries it charges, for as long as it
 * lives. Peer accounts still carry every copy in full (--peer-max-queued). */
struct kp_budget_share;

/* Makes a share of msg's bytes (msg keeps its own reference) charged to
 * total, with one reference (the caller's). Cannot fail. */
struct kp_budget_share *kp_budget_share_new(struct kp_budget *total, const zmq_msg_t *msg);

/* Drops the caller's reference; *sp = NULL. Idempotent. Any thread. */
void kp_budget_share_release(struct kp_budget_share **sp);

/* *out becomes a frame of the share's bytes for one send (its charge to
 * the total is given back until libzmq frees it). KP_ESYS if libzmq could
 * not make the frame (nothing changed). */
enum kp_err kp_budget_share_copy(struct kp_budget_share *s, zmq_msg_t *out);

#endif
