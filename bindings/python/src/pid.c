/*
 * pid.c: libzmq's getpid() answered from memory in this process.
 *
 * libzmq 4.3 calls getpid() on every mailbox signal and every mailbox wait,
 * to notice that it runs in a forked child; glibc stopped caching the pid
 * in 2.25, so each of those is a system call. In a Kelpie client or worker
 * that was 0.4-0.6 getpid() a call at 100 in flight, a third of the
 * process's system calls (benchmarks/rpc/cpu.py --perf), where a system
 * call costs ~1 µs in a virtual machine.
 *
 * kelpied defines getpid in its executable (broker/pid.c); an extension
 * module cannot, since it is loaded after libc is bound. Instead, at import
 * this file points libzmq's own import of getpid (its PLT slot, found from
 * its dynamic section) at kp_pid_get below. Only libzmq is changed: the
 * rest of the process, Python's os.getpid() included, keeps libc's.
 *
 * The cached value is right as long as the process does not become another
 * process behind it. fork() runs the atfork handler, which forgets it, so
 * a child (os.fork, multiprocessing) is still told apart as before; vfork
 * and posix_spawn children run no libzmq code before they exec.
 *
 * The slot is left alone when it is read-only (a library linked with
 * -z now: RELRO covers it), when the relocations are not of a kind this
 * knows (x86-64 and AArch64 RELA only), or when KELPIE_GETPID=libc is set
 * (the operator's way back). _getpid_hook() says which.
 */
#define _GNU_SOURCE
#include "kp.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#define PID_JUMP_SLOT R_X86_64_JUMP_SLOT
#define PID_GLOB_DAT  R_X86_64_GLOB_DAT
#elif defined(__aarch64__)
#define PID_JUMP_SLOT R_AARCH64_JUMP_SLOT
#define PID_GLOB_DAT  R_AARCH64_GLOB_DAT
#endif

static _Atomic pid_t pid_known;
/* What the hook did, for _getpid_hook(): a static string. */
static const char *pid_state = "not tried";
/* A slot the hook wrote (NULL: none), for _libzmq_getpid(). */
static pid_t (**pid_slot)(void);

static void pid_forget(void)
{
    atomic_store_explicit(&pid_known, 0, memory_order_relaxed);
}

static pid_t kp_pid_get(void)
{
    pid_t pid = atomic_load_explicit(&pid_known, memory_order_relaxed);
    if (pid != 0) {
        return pid;
    }
    pid = (pid_t)syscall(SYS_getpid);
    atomic_store_explicit(&pid_known, pid, memory_order_relaxed);
    return pid;
}

#ifdef PID_JUMP_SLOT

/* The object that holds `addr` (libzmq), as dl_iterate_phdr sees it. */
struct pid_lib {
    uintptr_t base;
    const ElfW(Phdr) * phdr;
    ElfW(Half) phnum;
    int found;
};

static int pid_find_lib(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    struct pid_lib *lib = data;
    if (info->dlpi_addr == lib->base) {
        lib->phdr = info->dlpi_phdr;
        lib->phnum = info->dlpi_phnum;
        lib->found = 1;
        return 1;
    }
    return 0;
}

/* A dynamic entry's address: glibc relocates these in place when it loads
 * a library, other loaders may leave them as offsets from the base. */
static uintptr_t pid_dyn_addr(uintptr_t base, ElfW(Addr) ptr)
{
    return ptr < base ? base + ptr : ptr;
}

/* Whether [addr, addr + 8) lies in the library's RELRO (read-only after
 * relocation): writing there would fault. */
static int pid_in_relro(const struct pid_lib *lib, uintptr_t addr)
{
    for (ElfW(Half) i = 0; i < lib->phnum; i++) {
        const ElfW(Phdr) *ph = &lib->phdr[i];
        if (ph->p_type == PT_GNU_RELRO) {
            uintptr_t start = lib->base + ph->p_vaddr;
            if (addr + sizeof(void *) > start && addr < start + ph->p_memsz) {
                return 1;
            }
        }
    }
    return 0;
}

/* Points every writable getpid slot among `count` relocations at
 * kp_pid_get; returns how many, or -1 when one is read-only. */
static int pid_patch(const struct pid_lib *lib, const ElfW(Rela) * rela, size_t count,
                     const ElfW(Sym) * symtab, const char *strtab)
{
    int patched = 0;
    for (size_t i = 0; i < count; i++) {
        unsigned long type = ELF64_R_TYPE(rela[i].r_info);
        if (type != PID_JUMP_SLOT && type != PID_GLOB_DAT) {
            continue;
        }
        const ElfW(Sym) *sym = &symtab[ELF64_R_SYM(rela[i].r_info)];
        if (strcmp(strtab + sym->st_name, "getpid") != 0) {
            continue;
        }
        uintptr_t slot = lib->base + rela[i].r_offset;
        if (pid_in_relro(lib, slot)) {
            return -1;
        }
        /* One aligned word: a libzmq thread calling getpid meanwhile reads
         * the old function or the new one, both right. */
        pid_t (*fn)(void) = kp_pid_get;
        __atomic_store((pid_t(**)(void))slot, &fn, __ATOMIC_RELEASE);
        pid_slot = (pid_t(**)(void))slot;
        patched++;
    }
    return patched;
}

static const char *pid_hook_libzmq(void)
{
    Dl_info info;
    if (dladdr((void *)zmq_version, &info) == 0 || info.dli_fbase == NULL) {
        return "off: libzmq not found";
    }
    struct pid_lib lib = {.base = 0};
    /* dli_fbase is where the ELF header is mapped; dlpi_addr is the load
     * bias. They are equal for a shared library (its first segment at 0). */
    lib.base = (uintptr_t)info.dli_fbase;
    dl_iterate_phdr(pid_find_lib, &lib);
    if (!lib.found) {
        return "off: libzmq's program headers not found";
    }
    const ElfW(Dyn) *dyn = NULL;
    for (ElfW(Half) i = 0; i < lib.phnum; i++) {
        if (lib.phdr[i].p_type == PT_DYNAMIC) {
            dyn = (const ElfW(Dyn) *)(lib.base + lib.phdr[i].p_vaddr);
        }
    }
    if (dyn == NULL) {
        return "off: libzmq has no dynamic section";
    }
    uintptr_t jmprel = 0, rela = 0, symtab = 0, strtab = 0;
    size_t pltrelsz = 0, relasz = 0;
    long pltrel = 0;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        switch (dyn->d_tag) {
        case DT_JMPREL:
            jmprel = pid_dyn_addr(lib.base, dyn->d_un.d_ptr);
            break;
        case DT_PLTRELSZ:
            pltrelsz = dyn->d_un.d_val;
            break;
        case DT_PLTREL:
            pltrel = (long)dyn->d_un.d_val;
            break;
        case DT_RELA:
            rela = pid_dyn_addr(lib.base, dyn->d_un.d_ptr);
            break;
        case DT_RELASZ:
            relasz = dyn->d_un.d_val;
            break;
        case DT_SYMTAB:
            symtab = pid_dyn_addr(lib.base, dyn->d_un.d_ptr);
            break;
        case DT_STRTAB:
            strtab = pid_dyn_addr(lib.base, dyn->d_un.d_ptr);
            break;
        default:
            break;
        }
    }
    if (symtab == 0 || strtab == 0 || (jmprel != 0 && pltrel != DT_RELA)) {
        return "off: libzmq's relocations are not RELA";
    }
    const ElfW(Sym) *syms = (const ElfW(Sym) *)symtab;
    const char *strs = (const char *)strtab;
    int a = 0, b = 0;
    if (jmprel != 0) {
        a = pid_patch(&lib, (const ElfW(Rela) *)jmprel, pltrelsz / sizeof(ElfW(Rela)), syms, strs);
    }
    if (a >= 0 && rela != 0) {
        b = pid_patch(&lib, (const ElfW(Rela) *)rela, relasz / sizeof(ElfW(Rela)), syms, strs);
    }
    if (a < 0 || b < 0) {
        return "off: libzmq's getpid slot is read-only";
    }
    if (a + b == 0) {
        return "off: libzmq imports no getpid";
    }
    return "on";
}

#else

static const char *pid_hook_libzmq(void)
{
    return "off: not x86-64 or AArch64";
}

#endif

/* _libzmq_getpid() -> int: getpid() as libzmq's own calls see it, through
 * the slot the hook wrote (libc's when there is none), for the tests. */
static PyObject *pid_libzmq_getpid(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    pid_t (*fn)(void) = getpid;
    if (pid_slot != NULL) {
        __atomic_load(pid_slot, &fn, __ATOMIC_ACQUIRE);
    }
    return PyLong_FromLong((long)fn());
}

static PyObject *pid_hook_state(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyUnicode_FromString(pid_state);
}

static PyMethodDef pid_module_methods[] = {
    {"_getpid_hook", pid_hook_state, METH_NOARGS,
     "_getpid_hook() -> str: 'on' when libzmq's getpid() is answered from memory (pid.c), "
     "else 'off: why'."},
    {"_libzmq_getpid", pid_libzmq_getpid, METH_NOARGS,
     "_libzmq_getpid() -> int: the pid libzmq's getpid() answers in this process."},
    {NULL, NULL, 0, NULL},
};

int kp_pid_init(PyObject *module, kp_state *st)
{
    (void)st;
    /* Once a process: a second import (a subinterpreter) finds it done. */
    static atomic_flag hooked = ATOMIC_FLAG_INIT;
    if (!atomic_flag_test_and_set(&hooked)) {
        const char *env = getenv("KELPIE_GETPID");
        if (env != NULL && strcmp(env, "libc") == 0) {
            pid_state = "off: KELPIE_GETPID=libc";
        } else if (pthread_atfork(NULL, NULL, pid_forget) != 0) {
            pid_state = "off: pthread_atfork failed";
        } else {
            pid_state = pid_hook_libzmq();
        }
    }
    return PyModule_AddFunctions(module, pid_module_methods);
}
