/* test_pid: kelpied's getpid() (broker/pid.c), linked into this program as
 * into kelpied, so that libc, libzmq and this file all get it. It must say
 * what the kernel says: in every thread, and in a child made by fork()
 * after the parent's pid was remembered (libzmq tells a forked child by
 * it; Criterion itself forks to run each test). */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <pthread.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

static pid_t tp_kernel_pid(void)
{
    return (pid_t)syscall(SYS_getpid);
}

Test(pid, is_the_kernels_and_stays_so)
{
    for (int i = 0; i < 3; i++)
        cr_assert_eq(getpid(), tp_kernel_pid());
}

static void *tp_thread(void *arg)
{
    *(pid_t *)arg = getpid();
    return NULL;
}

Test(pid, is_the_same_in_every_thread)
{
    pid_t seen[4] = {0};
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, tp_thread, &seen[i]), 0);
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(pthread_join(t[i], NULL), 0);
        cr_assert_eq(seen[i], tp_kernel_pid());
    }
}

/* Exit status 0 when the child's getpid() is its own, 1 when it is the
 * parent's, 2 otherwise. */
static int tp_child(pid_t parent)
{
    pid_t mine = getpid();
    if (mine == parent)
        return 1;
    return mine == tp_kernel_pid() ? 0 : 2;
}

Test(pid, a_forked_child_gets_its_own)
{
    pid_t parent = getpid(); /* remembered from here on */
    cr_assert_eq(parent, tp_kernel_pid());
    pid_t child = fork();
    cr_assert_neq(child, -1);
    if (child == 0)
        _exit(tp_child(parent));
    int status = 0;
    cr_assert_eq(waitpid(child, &status, 0), child);
    cr_assert(WIFEXITED(status));
    cr_assert_eq(WEXITSTATUS(status), 0, "child's getpid(): %s",
                 WEXITSTATUS(status) == 1 ? "the parent's" : "neither");
    cr_assert_eq(getpid(), parent);
}

/* libzmq checks the pid around its mailboxes: a context made before a fork
 * must still work in the parent after it, messages and all. */
Test(pid, libzmq_in_the_parent_after_a_fork)
{
    void *ctx = zmq_ctx_new();
    void *a = zmq_socket(ctx, ZMQ_PAIR);
    void *b = zmq_socket(ctx, ZMQ_PAIR);
    cr_assert_eq(zmq_bind(a, "inproc://pid"), 0);
    cr_assert_eq(zmq_connect(b, "inproc://pid"), 0);
    pid_t child = fork();
    cr_assert_neq(child, -1);
    if (child == 0)
        _exit(0);
    int status = 0;
    cr_assert_eq(waitpid(child, &status, 0), child);
    cr_assert_eq(zmq_send(b, "ping", 4, 0), 4);
    char buf[8];
    cr_assert_eq(zmq_recv(a, buf, sizeof buf, 0), 4);
    cr_assert_eq(memcmp(buf, "ping", 4), 0);
    zmq_close(a);
    zmq_close(b);
    cr_assert_eq(zmq_ctx_term(ctx), 0);
}
