/*
 * The only C that runs in the Jupyter server: start the helper (nsinit, the
 * seed's Child) with vfork semantics. The clone shares the server's memory
 * and the calling thread waits until it has exec'd, so nothing is copied
 * and nothing but the exec runs there: clear close-on-exec on the Child's
 * sync socket in the clone's own fd table, execveat the sealed memfd, and
 * record the errno when that fails. Everything else happens in the helper,
 * in its own memory.
 */
#define _GNU_SOURCE
#if !defined(__x86_64__) && !defined(__aarch64__)
#error "nsprovisioner starts its helper through a clone3 trampoline written for x86_64 and aarch64 only (csrc/nsclone.c, nsx_vfork3); port it to this architecture"
#endif

#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nsexec.h"

/* The clone's stack, inside nsx_start_helper's frame: the thread that owns
 * that frame is stopped until the clone has exec'd (CLONE_VFORK). */
#define NSX_LAUNCH_STACK 8192

struct launch {
    int exec_fd;
    const char *path;
    char *const *argv;
    char *const *envp;
    int sync_fd;
    int memfd_errno;  /* written by the clone, read once it is gone */
    int err;
};

/*
 * clone3 that runs fn(arg) on args->stack in the new process, which must
 * exec or exit there (it can't return into the caller's frame). The parent
 * gets the pid or -errno. fn and arg ride in registers that the syscall
 * keeps and the new process inherits.
 */
long nsx_vfork3(struct clone_args *args, size_t size, void (*fn)(struct launch *),
                struct launch *arg);

#if defined(__x86_64__)
__asm__(".text\n"
        ".globl nsx_vfork3\n"
        ".hidden nsx_vfork3\n"
        ".type nsx_vfork3, @function\n"
        "nsx_vfork3:\n"
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
        "    mov $127, %edi\n"
        "    mov $231, %eax\n" /* __NR_exit_group */
        "    syscall\n"
        "    hlt\n"
        ".size nsx_vfork3, .-nsx_vfork3\n");
#elif defined(__aarch64__)
__asm__(".text\n"
        ".globl nsx_vfork3\n"
        ".hidden nsx_vfork3\n"
        ".type nsx_vfork3, %function\n"
        "nsx_vfork3:\n"
        "    mov x9, x2\n"
        "    mov x10, x3\n"
        "    mov x8, #435\n" /* __NR_clone3 */
        "    svc #0\n"
        "    cbz x0, 1f\n"
        "    ret\n"
        "1:  mov x29, xzr\n"
        "    mov x0, x10\n"
        "    blr x9\n"
        "    mov x0, #127\n"
        "    mov x8, #94\n" /* __NR_exit_group */
        "    svc #0\n"
        "    brk #0\n"
        ".size nsx_vfork3, .-nsx_vfork3\n");
#endif

/*
 * The clone, on the server's memory with the stopped thread's TLS: plain
 * syscall(2)s only (their errno store lands in that stopped thread, which
 * nsx_start_helper restores), no interceptable libc, and every signal
 * blocked, so that no handler of the server runs here.
 */
__attribute__((noreturn, no_sanitize("address", "undefined"))) static void
launch(struct launch *l)
{
    if (syscall(SYS_fcntl, l->sync_fd, F_SETFD, 0) < 0) {
        l->err = errno;
        syscall(SYS_exit_group, 127);
    }
    if (l->exec_fd >= 0) {
        syscall(SYS_execveat, l->exec_fd, "", l->argv, l->envp, AT_EMPTY_PATH);
        /* refused (vm.memfd_noexec, a noexec policy): the installed file */
        l->memfd_errno = errno;
        l->err = errno;
    }
    if (l->path) {
        syscall(SYS_execve, l->path, l->argv, l->envp);
        l->err = errno;
    }
    for (;;)
        syscall(SYS_exit_group, 127);
}

int nsx_start_helper(int exec_fd, const char *path, char *const argv[], char *const envp[],
                     int sync_fd, int cgroup_fd, int *pidfd, int *exec_failed,
                     int *memfd_errno)
{
    char stack[NSX_LAUNCH_STACK] __attribute__((aligned(16)));
    struct launch l = {exec_fd, path, argv, envp, sync_fd, 0, 0};
    struct clone_args args;
    /* the kernel's sigset: pthread_sigmask would leave glibc's own SIGCANCEL
     * and SIGSETXID unblocked, with the server's handlers installed */
    uint64_t all = ~(uint64_t)0, old = 0;
    int saved_errno = errno;
    long pid;

    *pidfd = -1;
    *exec_failed = 0;
    *memfd_errno = 0;
    memset(&args, 0, sizeof(args));
    args.flags = CLONE_VM | CLONE_VFORK | CLONE_PIDFD;
    args.pidfd = (uint64_t)(uintptr_t)pidfd;
    args.exit_signal = SIGCHLD;
    args.stack = (uint64_t)(uintptr_t)stack;
    args.stack_size = sizeof(stack);
    if (cgroup_fd >= 0) {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)cgroup_fd;
    }

    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &all, &old, sizeof(all));
    pid = nsx_vfork3(&args, sizeof(args), launch, &l);
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &old, NULL, sizeof(old));
    errno = saved_errno;
    if (pid < 0)
        return (int)pid;
    if (l.err) {
        /* it has exited already: reaping does not wait */
        *exec_failed = 1;
        *memfd_errno = l.memfd_errno;
        waitpid((pid_t)pid, NULL, __WALL);
        close(*pidfd);
        *pidfd = -1;
        errno = saved_errno;
        return -l.err;
    }
    return (int)pid;
}
