/*
 * curve.h: CURVE keys for the C client and worker, and a handshake whose
 * failure is visible (the C twin of kelpie/_security.py).
 *
 * ZeroMQ makes a refused handshake look like a broker that is down. A
 * kpc_handshake watches the socket's monitor events while it connects and
 * turns a refusal into KELPIE_UNAUTHENTICATED with the reason: the broker's
 * ZAP handler refused the key (HANDSHAKE_FAILED_AUTH, status 400: not on the
 * allow-list of the socket connected to, which names the role), CURVE on one
 * side only (mechanism mismatch), or a server key that is not the broker's
 * (it hangs up). A broker that is not there at all is not a refusal: the
 * wait ends and the liveness rules apply as without CURVE. Nor is one that
 * hangs up mid-handshake and then no longer listens (killed as we
 * connected): a hang-up counts as a refusal only if a connect to the
 * endpoint still succeeds (a non-blocking probe, bounded by 0.5 s).
 */
#ifndef KPC_CURVE_H
#define KPC_CURVE_H

#include <stdbool.h>
#include <stddef.h>

#include "kelpie.h"

/* Keys read from a kelpie_curve, as z85 text. */
typedef struct kpc_keys {
    char public_key[41];
    char secret_key[41];
    char server_key[41];
} kpc_keys;

/* Reads curve's files into keys; KELPIE_ERR_INVAL with why on an unreadable
 * file or one that holds no key. */
kelpie_status kpc_curve_load(const kelpie_curve *curve, kpc_keys *keys, char *why, size_t why_len);

/* The keys for broker index of n (an endpoint list): curve->server_key may
 * be a comma-separated list, one key (file or z85) per endpoint in the same
 * order, or one key for all. KELPIE_ERR_INVAL with why when the count fits
 * neither, or as kpc_curve_load. */
kelpie_status kpc_curve_load_for(const kelpie_curve *curve, size_t index, size_t n, kpc_keys *keys,
                                 char *why, size_t why_len);

/* Makes sock a CURVE client with keys. */
kelpie_status kpc_curve_apply(void *sock, const kpc_keys *keys);

/* A connect being watched. */
typedef struct kpc_handshake {
    void *pair;     /* PAIR reading sock's monitor; NULL: nothing watched */
    void *sock;     /* the socket connecting */
    bool connected; /* TCP is up */
} kpc_handshake;

/* Starts watching sock (before zmq_connect). inproc:// is not watched. */
kelpie_status kpc_handshake_begin(kpc_handshake *hs, void *ctx, void *sock, const char *endpoint);

/* Waits up to timeout_ms for the outcome and stops watching. Returns
 * KELPIE_OK (succeeded, or nobody listens there, or the time passed) or
 * KELPIE_UNAUTHENTICATED with the reason in why. role names the allow-list
 * ("client", "worker"); keys is NULL for a plain-text peer. */
kelpie_status kpc_handshake_wait(kpc_handshake *hs, int timeout_ms, const char *role,
                                 const char *endpoint, const kpc_keys *keys, char *why,
                                 size_t why_len);

/* kpc_handshake_wait without the stop: the watch stays on for the socket's
 * life (a lane of several brokers, which must tell a refused broker from a
 * lost one long after connecting). End it with kpc_handshake_end. */
kelpie_status kpc_handshake_settle(kpc_handshake *hs, int timeout_ms, const char *role,
                                   const char *endpoint, const kpc_keys *keys, char *why,
                                   size_t why_len);

/* What a kept watch saw (kpc_handshake_next). */
typedef enum kpc_seen {
    KPC_SEEN_NOTHING,   /* no event waiting */
    KPC_SEEN_OTHER,     /* an event that changes nothing (a retried connect) */
    KPC_SEEN_CONNECTED, /* TCP is up; a handshake follows */
    KPC_SEEN_ACCEPTED,  /* a handshake succeeded */
    KPC_SEEN_CLOSED,    /* the connection closed: the broker died, or the link did */
    KPC_SEEN_REFUSED,   /* a handshake was refused; why says how (as kpc_handshake_wait) */
} kpc_seen;

/* Reads and judges the next waiting event of a kept watch, without
 * waiting. Without CURVE a connection cut during the handshake (a broker
 * killed just then) is no refusal, as in kelpie/_brokers.py. */
kpc_seen kpc_handshake_next(kpc_handshake *hs, const char *role, const char *endpoint,
                            const kpc_keys *keys, char *why, size_t why_len);

/* Stops watching (before the socket is closed). Idempotent. */
void kpc_handshake_end(kpc_handshake *hs);

#endif
