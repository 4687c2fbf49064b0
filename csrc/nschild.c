/*
 * The Child (stage 1): the helper as the Parent exec'd it. It reads the
 * plan, makes the user namespace and asks the Parent for its maps, makes
 * the other namespaces (all but cgroup), clones the GrandChild with
 * CLONE_PARENT, reports both pids, and exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "nsstage.h"

#define STEP(step, call, what)                                                \
    do {                                                                      \
        long rc_ = nsx_checked(plan, step, (call));                           \
        if (rc_ < 0)                                                          \
            nsx_bail(fd, NSX_STAGE_CHILD, step, rc_, what, NULL, grandchild); \
    } while (0)

/*
 * The server's fds that were not close-on-exec came along with the exec:
 * keep only stdio (replaced before the command runs) and the sync socket.
 * The parent-death signal ties us to the server's thread that started us;
 * had that thread gone before the prctl, our parent changed (checked once
 * the plan says who the Parent is). We stay dumpable, as the exec left us:
 * the Parent writes our maps, and finds the GrandChild by our user
 * namespace should we die before reporting its pid.
 */
static long child_setup(int fd)
{
    if (fd > 3 && close_range(3, (unsigned)fd - 1, 0) < 0)
        return -errno;
    if (close_range((unsigned)fd + 1, ~0U, 0) < 0)
        return -errno;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        return -errno;
    return 0;
}

/*
 * fork with CLONE_PARENT: the GrandChild is the Parent's child, which can
 * hold a pidfd on it and reap it, while the new pid namespace makes it PID 1.
 * Its exit signal is the Child's (the kernel's rule for CLONE_PARENT). The
 * plain clone syscall is enough here (and valgrind knows it, not clone3).
 * Returns 0 in the GrandChild.
 */
static long clone_grandchild(void)
{
    return nsx_rc(syscall(SYS_clone, CLONE_PARENT, 0, 0, 0, 0));
}

_Noreturn void nsx_run_child(struct nsx_start *start)
{
    const struct nsx_plan *plan = NULL;
    int fd = start->sync_fd;
    long grandchild = 0, rc;

    prctl(PR_SET_NAME, "nsprov[1:CHILD]", 0, 0, 0);
    STEP(NSX_STEP_CHILD_SETUP, child_setup(fd), "set up the child");
    rc = nsx_read_plan(start);
    if (rc == -EPIPE)
        _exit(1);  /* the Parent gave up on this sandbox */
    if (rc < 0)
        nsx_bail(fd, NSX_STAGE_CHILD, NSX_STEP_READ_PLAN, rc, "read the plan", NULL, 0);
    plan = start->plan;
    STEP(NSX_STEP_READ_PLAN, 0, "read the plan");
    STEP(NSX_STEP_CHILD_SETUP, getppid() == plan->parent_pid ? 0 : -ESRCH,
         "check that the server is alive");

    STEP(NSX_STEP_UNSHARE_USER, nsx_rc(unshare(CLONE_NEWUSER)), "unshare(CLONE_NEWUSER)");
    STEP(NSX_STEP_SEND_USERMAP_PLS, nsx_send_sync(fd, NSX_SYNC_USERMAP_PLS, 0, 0),
         "send SYNC_USERMAP_PLS");
    STEP(NSX_STEP_WAIT_USERMAP_ACK, nsx_wait_sync(fd, NSX_SYNC_USERMAP_ACK),
         "wait for SYNC_USERMAP_ACK");

    /* Everything but cgroup: the GrandChild unshares that once it is in
     * its final cgroup. */
    STEP(NSX_STEP_UNSHARE_NAMESPACES, nsx_rc(unshare(plan->unshare_flags)),
         "unshare the pid, mount, ipc, uts and net namespaces");

    /* named before the clone, so that it carries its name from birth */
    prctl(PR_SET_NAME, "nsprov[2:INIT]", 0, 0, 0);
    grandchild = plan->fault_step == NSX_STEP_CLONE_GRANDCHILD
                     ? nsx_checked(plan, NSX_STEP_CLONE_GRANDCHILD, 0)
                     : clone_grandchild();
    if (grandchild == 0) {
        close(fd);
        start->sync_fd = start->grandchild_sync_fd;
        nsx_run_grandchild(start);
    }
    prctl(PR_SET_NAME, "nsprov[1:CHILD]", 0, 0, 0);
    if (grandchild < 0)
        nsx_bail(fd, NSX_STAGE_CHILD, NSX_STEP_CLONE_GRANDCHILD, grandchild,
                 "clone the grandchild", NULL, 0);
    /* from here on every failure report carries the GrandChild's pid */
    close(start->grandchild_sync_fd);

    STEP(NSX_STEP_SEND_RECVPID_PLS,
         nsx_send_sync(fd, NSX_SYNC_RECVPID_PLS, (int)getpid(), (int)grandchild),
         "send SYNC_RECVPID_PLS");
    STEP(NSX_STEP_WAIT_RECVPID_ACK, nsx_wait_sync(fd, NSX_SYNC_RECVPID_ACK),
         "wait for SYNC_RECVPID_ACK");
    STEP(NSX_STEP_SEND_CHILD_READY, nsx_send_sync(fd, NSX_SYNC_CHILD_READY, 0, 0),
         "send SYNC_CHILD_READY");
    _exit(0);
}
