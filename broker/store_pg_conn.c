/* store_pg_conn.c: how every connection of the PostgreSQL store is opened.
 *
 * libpq's defaults suit a program a person watches: no timeout anywhere. A
 * broker's connection whose link goes silent (a cut cable, a firewall that
 * drops, a server host that lost power: no RST, no FIN) would hold the
 * journal on it until the kernel gives up retransmitting, about 15 minutes,
 * answering no SUBMIT meanwhile, and the listener's heartbeat would wait as
 * long. So each connection carries a TCP user timeout and keepalives scaled
 * to the lease window, and connects within a bound: a silent link fails
 * like a closed one, within seconds, and is dialled again. The user's
 * conninfo is read after these defaults, so it overrides any of them
 * (libpq keeps a keyword's last value). Unix-socket connections ignore the
 * TCP ones.
 */
#include <stdio.h>

#include "store_pg_impl.h"

#define PG_USER_TIMEOUT_MIN_MS 5000

void kp_pg_conn_params_init(struct kp_pg_conn_params *p, const char *conninfo, uint64_t lease_ms)
{
    /* Not below 5 s: a congested link stalls for a second or two without
     * being cut, and a connection lost mid-COMMIT leaves a group in doubt.
     * Past one lease window the other brokers take this one's leases
     * anyway, so waiting longer for the link buys nothing. */
    uint64_t ut = lease_ms > PG_USER_TIMEOUT_MIN_MS ? lease_ms : PG_USER_TIMEOUT_MIN_MS;
    uint64_t s = (ut + 999) / 1000;
    snprintf(p->user_timeout, sizeof p->user_timeout, "%llu", (unsigned long long)ut);
    /* Probes start after half the timeout of quiet: an idle connection (the
     * relay's, the journal's between groups) is found dead within about
     * the timeout too, not only one with data waiting for an ACK. */
    snprintf(p->idle, sizeof p->idle, "%llu", (unsigned long long)(s + 1) / 2);
    snprintf(p->connect, sizeof p->connect, "%llu", (unsigned long long)s);
    size_t n = 0;
#define PARAM(k, v) (p->keys[n] = (k), p->values[n] = (v), n++)
    PARAM("application_name", "kelpied");
    PARAM("connect_timeout", p->connect);
    PARAM("keepalives", "1");
    PARAM("keepalives_idle", p->idle);
    PARAM("keepalives_interval", "1");
    PARAM("keepalives_count", "3");
    PARAM("tcp_user_timeout", p->user_timeout);
    PARAM("dbname", conninfo); /* expanded: a URI or key=value pairs */
#undef PARAM
    p->keys[n] = p->values[n] = NULL;
}
