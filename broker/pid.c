/* pid: kelpied's getpid(), which answers from memory.
 *
 * libzmq 4.3 calls getpid() on every mailbox signal and every mailbox
 * wait, to notice that it runs in a forked child; glibc stopped caching
 * the pid in 2.25, so each of those is a system call. In kelpied that is
 * 0.7 getpid() a forwarded call (main thread and I/O thread, measured with
 * benchmarks/rpc/cpu.py --perf), a third of the broker's system calls; in
 * a virtual machine where a system call is expensive it was ~1 µs of the
 * broker's ~9 µs of CPU a call.
 *
 * A getpid defined in the executable comes before libc's for every shared
 * library that calls it (ELF symbol interposition), so libzmq and czmq get
 * this one. It is right as long as the process does not become another
 * process behind it: kelpied never forks, spawns or clones (a child made
 * by fork() would still be told apart: the atfork handler forgets the
 * pid). This file is linked into kelpied only, never into a library, so a
 * program that embeds libkelpie keeps libc's. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

static _Atomic pid_t pid_known;

static void pid_forget(void)
{
    atomic_store_explicit(&pid_known, 0, memory_order_relaxed);
}

pid_t getpid(void)
{
    static atomic_flag hooked = ATOMIC_FLAG_INIT;
    pid_t pid = atomic_load_explicit(&pid_known, memory_order_relaxed);
    if (pid != 0)
        return pid;
    if (!atomic_flag_test_and_set(&hooked))
        pthread_atfork(NULL, NULL, pid_forget);
    pid = (pid_t)syscall(SYS_getpid);
    atomic_store_explicit(&pid_known, pid, memory_order_relaxed);
    return pid;
}
