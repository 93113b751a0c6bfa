/*
 * test_curve_dying.c: the C library tells a broker that dies during the
 * handshake from one that refuses it. libzmq reports both as "handshake
 * failed, no detail" (the connection closed mid-handshake); a refusing broker
 * still listens, a dead one does not. A fake "broker" (a plain listener on
 * 127.0.0.1, or on an abstract ipc:// name) accepts one connection, hangs up
 * mid-greeting, and either stops listening (dying) or keeps listening
 * (refusing).
 */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <stddef.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <zmq.h>

#include "kelpie_test.h"

TestSuite(curve_dying, .fini = kt_teardown, .timeout = 60);

typedef struct fake_broker {
    int lfd;
    bool keep_listening;
    atomic_bool hung_up;
    pthread_t thread;
    bool joined;
    char endpoint[96];
} fake_broker;

static void *fake_main(void *arg)
{
    fake_broker *f = arg;
    struct pollfd p = {f->lfd, POLLIN, 0};
    if (poll(&p, 1, 10000) <= 0)
        return NULL;
    int c = accept(f->lfd, NULL, NULL);
    if (!f->keep_listening) {
        close(f->lfd); /* the broker is gone: nothing listens any more */
        f->lfd = -1;
    }
    if (c >= 0) {
        char buf[64];
        struct pollfd q = {c, POLLIN, 0};
        if (poll(&q, 1, 5000) > 0 && read(c, buf, sizeof buf) < 0)
            buf[0] = '\0'; /* the greeting started, or not: hang up either way */
        close(c);
    }
    atomic_store(&f->hung_up, true);
    return NULL;
}

/* ipc: on an abstract name (libzmq's ipc://@name), nothing to unlink. */
static void fake_start(fake_broker *f, bool keep_listening, bool ipc)
{
    memset(f, 0, sizeof *f);
    f->keep_listening = keep_listening;
    f->lfd = socket(ipc ? AF_UNIX : AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(f->lfd, 0);
    if (ipc) {
        static int seq;
        char name[48];
        snprintf(name, sizeof name, "kelpie-dying-%d-%d", (int)getpid(), ++seq);
        struct sockaddr_un un = {.sun_family = AF_UNIX};
        memcpy(un.sun_path + 1, name, strlen(name));
        socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(name));
        cr_assert_eq(bind(f->lfd, (struct sockaddr *)&un, len), 0);
        snprintf(f->endpoint, sizeof f->endpoint, "ipc://@%s", name);
    } else {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        cr_assert_eq(bind(f->lfd, (struct sockaddr *)&a, sizeof a), 0);
        socklen_t len = sizeof a;
        cr_assert_eq(getsockname(f->lfd, (struct sockaddr *)&a, &len), 0);
        snprintf(f->endpoint, sizeof f->endpoint, "tcp://127.0.0.1:%d", ntohs(a.sin_port));
    }
    cr_assert_eq(listen(f->lfd, 16), 0);
    cr_assert_eq(pthread_create(&f->thread, NULL, fake_main, f), 0);
}

/* Waits for the fake to be done with its one connection (at most 15 s). */
static void fake_join(fake_broker *f)
{
    if (!f->joined)
        pthread_join(f->thread, NULL);
    f->joined = true;
}

static void fake_stop(fake_broker *f)
{
    fake_join(f);
    if (f->lfd >= 0)
        close(f->lfd);
    f->lfd = -1;
}

/* A CURVE key pair for us (a file) and some server key: the fake speaks no
 * CURVE, so which one does not matter. */
static char key_dir[64], key_file[128], server_key[41];
static kelpie_curve curve;

static void make_curve(void)
{
    snprintf(key_dir, sizeof key_dir, "/tmp/kelpie-dying-XXXXXX");
    cr_assert_not_null(mkdtemp(key_dir));
    char pub[41], sec[41], spub[41], ssec[41];
    cr_assert_eq(zmq_curve_keypair(pub, sec), 0);
    cr_assert_eq(zmq_curve_keypair(spub, ssec), 0);
    snprintf(key_file, sizeof key_file, "%s/client", key_dir);
    FILE *f = fopen(key_file, "w");
    cr_assert_not_null(f);
    fprintf(f, "# secret\n%s\n", sec);
    fclose(f);
    memcpy(server_key, spub, sizeof server_key);
    curve = (kelpie_curve){key_file, server_key};
}

static void drop_curve(void)
{
    unlink(key_file);
    rmdir(key_dir);
}

/* A client whose broker dies mid-handshake opens (the broker may come back)
 * and its call waits for a broker, ending DEADLINE_EXCEEDED: no
 * authentication error. */
static void client_waits_for_a_dead_broker(const kelpie_curve *with, bool ipc)
{
    fake_broker f;
    fake_start(&f, false, ipc);
    kelpie_client *c = NULL;
    char why[512] = "";
    kelpie_status rc = kelpie_client_open(f.endpoint, with, &c, why, sizeof why);
    /* The open may see the hang-up before the fake's thread says so. */
    fake_join(&f);
    cr_assert(atomic_load(&f.hung_up), "the fake broker never hung up");
    cr_assert_eq(rc, KELPIE_OK, "%s: %s: %s", f.endpoint, kelpie_status_name(rc), why);
    cr_assert_not_null(c);
    kelpie_reply reply = {0};
    rc = kelpie_client_call(c, "echo", "Echo", "x", 1, 300, &reply);
    cr_assert_eq(rc, KELPIE_DEADLINE_EXCEEDED, "%s: %s", kelpie_status_name(rc),
                 reply.message ? reply.message : "");
    kelpie_reply_fini(&reply);
    kelpie_client_destroy(&c);
    fake_stop(&f);
}

Test(curve_dying, plain_client_is_not_refused_by_a_dying_broker)
{
    client_waits_for_a_dead_broker(NULL, false);
    client_waits_for_a_dead_broker(NULL, true);
}

Test(curve_dying, curve_client_is_not_refused_by_a_dying_broker)
{
    make_curve();
    client_waits_for_a_dead_broker(&curve, false);
    client_waits_for_a_dead_broker(&curve, true);
    drop_curve();
}

/* Still listening after hanging up: a refusal, named as before. */
Test(curve_dying, a_broker_that_hangs_up_and_still_listens_refuses)
{
    make_curve();
    const struct {
        const kelpie_curve *with;
        const char *text;
    } cases[] = {{NULL, "hung up during the handshake"}, {&curve, "dropped our CURVE handshake"}};
    for (size_t i = 0; i < 2 * sizeof cases / sizeof cases[0]; i++) {
        fake_broker f;
        fake_start(&f, true, i >= 2); /* tcp://, then ipc:// */
        kelpie_client *c = NULL;
        char why[512] = "";
        int64_t start = kt_now_ms();
        cr_assert_eq(kelpie_client_open(f.endpoint, cases[i % 2].with, &c, why, sizeof why),
                     KELPIE_UNAUTHENTICATED, "%s: %s", f.endpoint, why);
        cr_assert_lt(kt_now_ms() - start, KELPIE_HANDSHAKE_TIMEOUT_MS);
        cr_assert_null(c);
        cr_assert_not_null(strstr(why, cases[i % 2].text), "'%s' not in '%s'", cases[i % 2].text,
                           why);
        fake_stop(&f);
    }
    drop_curve();
}

static void echo(kelpie_call *call, const void *payload, size_t len, void *arg)
{
    (void)arg;
    kelpie_call_reply(call, payload, len);
}

typedef struct run_state {
    kelpie_worker *w;
    atomic_int rc;
    atomic_bool returned;
} run_state;

static void *run_main(void *arg)
{
    run_state *s = arg;
    atomic_store(&s->rc, (int)kelpie_worker_run(s->w));
    atomic_store(&s->returned, true);
    return NULL;
}

/* A worker whose broker dies mid-handshake keeps running (retrying for the
 * broker's return) instead of ending KELPIE_UNAUTHENTICATED for good. */
Test(curve_dying, worker_keeps_running_when_its_broker_dies_mid_handshake)
{
    fake_broker f;
    fake_start(&f, false, false);
    run_state s = {.w = kelpie_worker_new(f.endpoint, "dying", 1)};
    cr_assert_not_null(s.w);
    cr_assert_eq(kelpie_worker_handle(s.w, "echo", NULL, echo, NULL), KELPIE_OK);
    cr_assert_eq(kelpie_worker_set_heartbeat(s.w, 100, 3), KELPIE_OK);
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, run_main, &s), 0);
    for (int i = 0; i < 1000 && !atomic_load(&f.hung_up); i++)
        kt_sleep_ms(10);
    cr_assert(atomic_load(&f.hung_up), "the fake broker never hung up");
    /* The probe is over in 0.5 s at most; a refusal ends run at once. */
    kt_sleep_ms(1500);
    bool returned = atomic_load(&s.returned);
    kelpie_worker_stop(s.w);
    pthread_join(t, NULL);
    cr_assert_not(returned, "run ended: %s (%s)", kelpie_status_name(atomic_load(&s.rc)),
                  kelpie_worker_error(s.w));
    cr_assert_eq(atomic_load(&s.rc), KELPIE_OK, "%s", kelpie_worker_error(s.w));
    kelpie_worker_destroy(&s.w);
    fake_stop(&f);
}
