/* auth: CURVE keys, allow-lists by role, and the broker's ZAP handler.
 *
 * With --key, the three broker sockets are CURVE servers and every peer
 * proves it holds a secret key whose public half is on an allow-list:
 * --allow-clients (frontend and intake), --allow-workers (backend; a line
 * may name the only services that key may serve), --allow-admins (frontend,
 * plus the admin-only methods of kelpie.broker). The ZAP handler is a REP
 * socket on this context's inproc://zeromq.zap.01, bound before any CURVE
 * socket, polled by the broker's loop (no thread, no process-global state);
 * it answers 200 with the peer's z85 public key as User-Id, which libzmq
 * then attaches to every message from that connection, or 400 with the
 * reason. Handlers read that User-Id per message (kp_auth_peer_key) and ask
 * again (kp_auth_allows), so a key removed by a reload (SIGHUP) is refused
 * on its next message without dropping anyone else's connection.
 *
 * Socket monitors on the three sockets report handshakes that fail before
 * ZAP is asked (a plain-text peer, a peer using the wrong server key): the
 * loop polls them too, and they are logged and counted like denials.
 *
 * Every denial is logged with the key's fingerprint (its first 12 z85
 * characters, greppable in the allow-list files) and the reason, and counted
 * in struct kp_stats (auth_* counters).
 */
#ifndef KP_AUTH_H
#define KP_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <zmq.h>

#include "error.h"
#include "stats.h"

/* Roles a key may hold; a key may hold several. */
enum kp_role {
    KP_ROLE_CLIENT = 1, /* frontend and intake: calls */
    KP_ROLE_WORKER = 2, /* backend: READY and answers */
    KP_ROLE_ADMIN = 4,  /* frontend: calls and admin methods of kelpie.broker */
};

/* z85 text of a CURVE key, with its NUL. */
#define KP_KEY_Z85 41

/* Characters of a key shown in logs (a prefix of its z85 text). */
#define KP_KEY_FINGERPRINT 12

struct kp_auth;

/* Where the keys come from (struct kp_config's fields). */
struct kp_auth_files {
    const char *key;           /* the broker's secret key file (kelpie keygen) */
    const char *allow_clients; /* allow-list files; NULL for none (nobody) */
    const char *allow_workers;
    const char *allow_admins;
};

/* Reads the broker's key and the allow-lists and binds the ZAP handler on
 * ctx (before any socket is made a CURVE server, so no handshake is ever
 * let through without it). On error returns KP_EINVAL or KP_ESYS with err
 * naming the file and line. */
enum kp_err kp_auth_new(void *ctx, const struct kp_auth_files *files, struct kp_stats *stats,
                        struct kp_auth **out, char *err, size_t errlen);

/* Closes the ZAP and monitor sockets and frees everything; *ap = NULL.
 * Idempotent. Call before the context is terminated. */
void kp_auth_destroy(struct kp_auth **ap);

/* Makes sock a CURVE server with the broker's key, its ZAP domain `name`
 * ("frontend", "backend" or "intake": the role the handler checks), and
 * watches its failed handshakes. Call before binding sock. */
enum kp_err kp_auth_secure(struct kp_auth *a, void *sock, const char *name);

/* Number of sockets the loop must poll for auth (ZAP and the monitors);
 * kp_auth_poll_socket(a, i) returns the i-th. */
size_t kp_auth_poll_count(const struct kp_auth *a);
void *kp_auth_poll_socket(const struct kp_auth *a, size_t i);

/* Handles what is ready on the i-th auth socket (ZAP requests, monitor
 * events) without waiting; never blocks. */
void kp_auth_on_ready(struct kp_auth *a, size_t i);

/* Re-reads the three allow-lists (SIGHUP). On any error the old lists stay
 * in force and the error is logged. Connections are kept; the next message
 * of a key no longer listed is refused by the handlers. Returns success. */
bool kp_auth_reload(struct kp_auth *a);

/* Returns the peer's z85 public key that ZAP attached to frame (any frame
 * but a ROUTER's routing id), or NULL if there is none. */
const char *kp_auth_peer_key(zmq_msg_t *frame);

/* Returns true if key (z85, may be NULL) holds any role in roles. */
bool kp_auth_allows(const struct kp_auth *a, const char *key, int roles);

/* Returns true if key may serve service: its --allow-workers line names no
 * services, or names this one. Otherwise writes why into buf. */
bool kp_auth_may_serve(const struct kp_auth *a, const char *key, const char *service, char *buf,
                       size_t len);

/* Returns true if method of kelpie.broker is admin-only. Reads (Ping,
 * GetJob, ListJobs) and CancelJob are open to clients; everything else
 * (Stats, RetryDead, PurgeDead, Drain and any method not listed) needs an
 * admin key. The dispatcher calls this with every method name, so a new
 * method is admin-only until listed. */
bool kp_auth_admin_only(const char *method);

/* Writes the fingerprint of key ("AbCdEfGhIjKl…", or "(none)") into buf
 * (at least KP_KEY_FINGERPRINT + 4 bytes). */
void kp_auth_fingerprint(const char *key, char *buf, size_t len);

#endif
