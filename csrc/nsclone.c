/*
 * The Parent's side of the C code: clone the Child (nsexec.c) from the
 * server, on the event loop's thread, and give back its stack afterwards.
 * This runs in the server as ordinary code, libc included.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/sched.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "nsexec.h"
#include "nsexec_stages.h"
#include "nsxsys.h"

/* The Child's frame holds the GrandChild's 64 KiB stack; the rest is slack.
 * Untouched pages cost nothing. */
#define NSX_CHILD_STACK (256 * 1024)

static size_t guard_size(void)
{
    return (size_t)sysconf(_SC_PAGESIZE);
}

/*
 * The stack both stages run on, in the server's memory. A guard page below
 * it turns an overflow into a fault of the stage instead of a write into
 * whatever the server mapped there.
 */
static void *map_stack(void)
{
    void *region = mmap(NULL, guard_size() + NSX_CHILD_STACK, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK | MAP_NORESERVE, -1, 0);

    if (region == MAP_FAILED)
        return NULL;
    if (mprotect(region, guard_size(), PROT_NONE) < 0) {
        munmap(region, guard_size() + NSX_CHILD_STACK);
        return NULL;
    }
    return region;
}

void nsx_free_stack(void *stack)
{
    if (stack)
        munmap(stack, guard_size() + NSX_CHILD_STACK);
}

int nsx_clone_child(const struct nsx_config *cfg, int *pidfd, int *into_cgroup, void **stack)
{
    struct clone_args args;
    sigset_t all, old;
    void *region = NULL;
    long pid;

    *pidfd = -1;
    *into_cgroup = 0;
    memset(&args, 0, sizeof(args));
    args.flags = CLONE_PIDFD;
    args.pidfd = (uint64_t)(uintptr_t)pidfd;
    args.exit_signal = SIGCHLD;
    if (cfg->cgroup_fd >= 0) {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)cfg->cgroup_fd;
    }
    if (NSX_SHARED_VM && cfg->share_memory) {
        region = *stack ? *stack : map_stack();  /* a stack of an earlier start, or new */
        *stack = NULL;
        if (region == NULL)
            return -errno;
        args.flags |= CLONE_VM;
        args.stack = (uint64_t)(uintptr_t)region + guard_size();
        args.stack_size = NSX_CHILD_STACK;
    }

    if (!region && *stack) {  /* fork mode: the Child runs on its copy of our stack */
        nsx_free_stack(*stack);
        *stack = NULL;
    }

    /*
     * No handler of the server may ever run in the Child: it would run on
     * the server's memory. So the Child starts with every signal blocked
     * and keeps them so (SIGKILL still works); the GrandChild resets every
     * handler before it unblocks them for the exec.
     */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = nsx_clone3(&args, sizeof(args), nsx_run_child, (void *)cfg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        nsx_free_stack(region);
        return (int)pid;
    }
    *into_cgroup = cfg->cgroup_fd >= 0;
    *stack = region;
    return (int)pid;
}

int nsx_can_share_memory(void)
{
    return NSX_SHARED_VM;
}

int nsx_dumpable(void)
{
    return prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
}
