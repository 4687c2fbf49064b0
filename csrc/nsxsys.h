/*
 * System calls for the clone stages, without libc.
 *
 * On x86_64 and aarch64 the Child is cloned with CLONE_VM (unless spawn()
 * picks the copy, see share_memory() there): it runs in the server's own
 * memory instead of a copy (copying a Jupyter server's page tables and
 * tearing the copy down again cost more than the rest of the start together). It also runs with the TLS of the server thread that
 * cloned it, and that thread keeps running: a libc wrapper's errno store
 * would land in the server thread's errno. So between clone and exec every
 * call goes straight to the kernel and returns -errno, and nothing else of
 * libc is used but the pure string functions (tests/test_csrc.py checks the
 * object files' undefined symbols).
 *
 * On other architectures the Child always gets a copy of the server's
 * memory (fork mode) and these calls go through syscall(3), whose errno is
 * then its own.
 */
#ifndef NSPROV_NSXSYS_H
#define NSPROV_NSXSYS_H

#include <stddef.h>
#include <sys/syscall.h>

#if defined(__x86_64__) || defined(__aarch64__)
#define NSX_SHARED_VM 1
#else
#define NSX_SHARED_VM 0
#endif

#if defined(__x86_64__)
static inline long nsx_syscall6(long n, long a, long b, long c, long d, long e, long f)
{
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;

    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#elif defined(__aarch64__)
static inline long nsx_syscall6(long n, long a, long b, long c, long d, long e, long f)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;

    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory", "cc");
    return x0;
}
#else
long nsx_syscall6(long n, long a, long b, long c, long d, long e, long f);
#endif

#define NSX_SYS6(n, a, b, c, d, e, f)                                              \
    nsx_syscall6((n), (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), (long)(f))
#define NSX_SYS5(n, a, b, c, d, e) NSX_SYS6(n, a, b, c, d, e, 0)
#define NSX_SYS4(n, a, b, c, d) NSX_SYS6(n, a, b, c, d, 0, 0)
#define NSX_SYS3(n, a, b, c) NSX_SYS6(n, a, b, c, 0, 0, 0)
#define NSX_SYS2(n, a, b) NSX_SYS6(n, a, b, 0, 0, 0, 0)
#define NSX_SYS1(n, a) NSX_SYS6(n, a, 0, 0, 0, 0, 0)
#define NSX_SYS0(n) NSX_SYS6(n, 0, 0, 0, 0, 0, 0)

/*
 * clone3 that runs fn(arg) in the new process and never returns there.
 * With CLONE_VM, args->stack must be set: the new process starts on it.
 * Returns the pid, or -errno.
 */
long nsx_clone3(void *args, size_t size, int (*fn)(void *), void *arg);

/* Exit this process (not the thread group of the server: the stages are
 * processes of their own). */
__attribute__((noreturn)) void nsx_exit(int status);

#endif
