/* broker: kelpied's event loop.
 *
 * One thread, one loop (see docs/architecture.md): poll the three sockets
 * and a wake pipe, read each socket under a budget, expire deadlines, send
 * heartbeats and check liveness, then, before sleeping, reap departed peers
 * and dispatch queued calls to free workers. kp_broker_run() is that loop;
 * it returns when a stop request has been served (drained or forced).
 *
 * This header is the broker's public face; behind it loop.c runs the loop
 * and broker.c builds and frees the broker (docs/architecture.md opens with
 * the map of every file).
 *
 * Naming: kp_ is the broker's internal prefix throughout broker/; static
 * helpers are named after their module (broker_, frontend_, ...).
 */
#ifndef KP_BROKER_H
#define KP_BROKER_H

#include <stdbool.h>
#include <stdint.h>
#include <zmq.h>

#include "config.h"
#include "error.h"
#include "stats.h"
#include "wire.h"

struct kp_broker;

/* Creates a broker: copies what it needs from cfg, creates --data-dir if
 * missing, binds the three sockets. zmq_ctx may be NULL (the broker makes
 * its own) or a context shared with in-process peers (inproc:// endpoints).
 * Returns KP_OK and *out, or an error after logging why (nothing leaks). */
enum kp_err kp_broker_new(const struct kp_config *cfg, void *zmq_ctx, struct kp_broker **out);

/* Closes the sockets and frees everything; *bp = NULL. Idempotent. */
void kp_broker_destroy(struct kp_broker **bp);

/* Runs the loop until a stop request has been served. Returns KP_OK, or
 * KP_ESYS if polling failed for a reason other than a signal. */
enum kp_err kp_broker_run(struct kp_broker *b);

/* Asks the loop to stop: the first request drains (new calls refused, running
 * ones get --shutdown-grace-ms), the second stops at once. Async-signal-safe
 * (one write() to a pipe) and callable from any thread. */
void kp_broker_stop(struct kp_broker *b);

/* Asks the loop to reread the --allow-* files (SIGHUP). Async-signal-safe
 * and callable from any thread; without --key it does nothing. */
void kp_broker_reload(struct kp_broker *b);

/* Returns a snapshot of the counters (for tests; Stats is the wire way). */
struct kp_stats kp_broker_stats(const struct kp_broker *b);

/* ---- driving the loop by hand, for tests and fuzzing ---------------------
 * Never mixed with kp_broker_run() on the same broker. Time only moves
 * forward: a `now` earlier than the broker's clock is ignored. */

/* Handles one message as if the loop had just read it from dir's socket —
 * frames[0..n) are moved out (for frontend and backend, frames[0] is the
 * peer's routing id) — at monotonic time now, then runs the expire, sweep
 * and before-sleep phases. Returns false once the broker has stopped. */
bool kp_broker_inject(struct kp_broker *b, enum kp_dir dir, zmq_msg_t *frames, size_t n,
                      uint64_t now);

/* Runs the stop-request, expire, sweep and before-sleep phases at time now.
 * Returns false once the broker has stopped. */
bool kp_broker_tick(struct kp_broker *b, uint64_t now);

/* Returns the broker's clock (monotonic ms). */
uint64_t kp_broker_now(const struct kp_broker *b);

/* Checks every internal invariant (credit accounting, queue lengths, maps
 * pointing at live calls in the right state, timers armed exactly for the
 * calls a client waits on, ...). O(everything): tests and fuzzing only.
 * Returns NULL, or a sentence naming the first invariant that does not hold. */
const char *kp_broker_check(const struct kp_broker *b);

#endif
