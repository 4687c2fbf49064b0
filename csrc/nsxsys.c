/*
 * The parts of nsxsys.h that are not inline: the clone3 trampoline and the
 * process exit, per architecture.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/sched.h>
#include <sched.h>
#include <stdint.h>
#include <unistd.h>

#include "nsxsys.h"

#if defined(__x86_64__)
/*
 * After the syscall the new process is on args->stack: it must not return
 * into the caller's frame (that belongs to the server thread), so it calls
 * fn right here and exits. fn and arg ride in r8/r9, which the syscall keeps
 * and the new process inherits. Without a new stack (fork mode) it goes on
 * from this function's own stack pointer, 8 bytes off the 16 the ABI wants
 * at a call: hence the alignment.
 */
__asm__(".text\n"
        ".globl nsx_clone3\n"
        ".hidden nsx_clone3\n"
        ".type nsx_clone3, @function\n"
        "nsx_clone3:\n"
        "    mov %rdx, %r8\n"
        "    mov %rcx, %r9\n"
        "    mov $435, %eax\n" /* __NR_clone3 */
        "    syscall\n"
        "    test %rax, %rax\n"
        "    jz 1f\n"
        "    ret\n"
        "1:  xor %ebp, %ebp\n"
        "    and $-16, %rsp\n"
        "    mov %r9, %rdi\n"
        "    call *%r8\n"
        "    mov %eax, %edi\n"
        "    mov $231, %eax\n" /* __NR_exit_group */
        "    syscall\n"
        "    hlt\n"
        ".size nsx_clone3, .-nsx_clone3\n");
#elif defined(__aarch64__)
__asm__(".text\n"
        ".globl nsx_clone3\n"
        ".hidden nsx_clone3\n"
        ".type nsx_clone3, %function\n"
        "nsx_clone3:\n"
        "    mov x9, x2\n"
        "    mov x10, x3\n"
        "    mov x8, #435\n" /* __NR_clone3 */
        "    svc #0\n"
        "    cbz x0, 1f\n"
        "    ret\n"
        "1:  mov x29, xzr\n"
        "    mov x0, x10\n"
        "    blr x9\n"
        "    mov x8, #94\n" /* __NR_exit_group */
        "    svc #0\n"
        "    brk #0\n"
        ".size nsx_clone3, .-nsx_clone3\n");
#else
/* Fork mode: the stages have their own copy of memory, errno included. */
long nsx_syscall6(long n, long a, long b, long c, long d, long e, long f)
{
    long ret = syscall(n, a, b, c, d, e, f);

    return ret < 0 ? -errno : ret;
}

long nsx_clone3(void *args, size_t size, int (*fn)(void *), void *arg)
{
    struct clone_args *ca = args;
    long pid;

    if (ca->stack) {
        /* a new stack (the GrandChild): glibc's clone switches to it */
        pid = clone(fn, (char *)(uintptr_t)(ca->stack + ca->stack_size),
                    (int)ca->flags | (int)ca->exit_signal, arg);
        return pid < 0 ? -errno : pid;
    }
    pid = syscall(SYS_clone3, args, size);
    if (pid < 0)
        return -errno;
    if (pid == 0)
        nsx_exit(fn(arg));
    return pid;
}
#endif

void nsx_exit(int status)
{
    for (;;)
        NSX_SYS1(SYS_exit_group, status);
}
