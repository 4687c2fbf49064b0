/*
 * The GrandChild (stage 2): PID 1 of the new pid namespace, a child of the
 * Parent (CLONE_PARENT). On SYNC_GRANDCHILD it sets the sandbox up, in the
 * order below, and then either becomes the init (nsinit.c) or, with
 * init = False, execs the command itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "nsmount.h"
#include "nsstage.h"

static long capset_all(int from_permitted)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    int i;

    if (syscall(SYS_capget, &hdr, data) < 0)
        return -errno;
    for (i = 0; i < 2; i++) {
        data[i].effective = from_permitted ? data[i].permitted : 0;
        if (!from_permitted) {
            data[i].permitted = 0;
            data[i].inheritable = 0;
        }
    }
    return nsx_rc(syscall(SYS_capset, &hdr, data));
}

/*
 * The identity is already mapped, so these calls only settle the saved and
 * effective ids (and drop the server's supplementary groups where setgroups
 * is allowed). KEEPCAPS keeps the capabilities the mounts below still need
 * when a namespace root becomes an ordinary user.
 */
static long set_ids(const struct nsx_plan *plan)
{
    long rc;

    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
        return -errno;
    if (plan->drop_groups && syscall(SYS_setgroups, 0, NULL) < 0)
        return -errno;
    if (syscall(SYS_setresgid, plan->gid, plan->gid, plan->gid) < 0)
        return -errno;
    if (syscall(SYS_setresuid, plan->uid, plan->uid, plan->uid) < 0)
        return -errno;
    if ((rc = capset_all(1)) < 0)
        return rc;
    return nsx_rc(prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0));
}

static long drop_caps(void)
{
    int cap;

    for (cap = 0; cap < 64; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            return -errno;
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        return -errno;
    return capset_all(0);
}

/* A new network namespace has only lo, and it is down. */
static long loopback_up(void)
{
    struct ifreq ifr;
    long rc;
    int sock;

    sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -errno;
    memset(&ifr, 0, sizeof(ifr));
    memcpy(ifr.ifr_name, "lo", 3);
    rc = nsx_rc(ioctl(sock, SIOCGIFFLAGS, &ifr));
    if (rc == 0) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        rc = nsx_rc(ioctl(sock, SIOCSIFFLAGS, &ifr));
    }
    close(sock);
    return rc;
}

/*
 * The sandbox's share of its user's per-user counters. Linux counts inotify
 * instances and watches (and namespaces) per user in every user namespace up
 * the chain, so a limit written here, in our own namespace while we hold
 * CAP_SYS_RESOURCE in it, caps this sandbox below what the server's user
 * has in total. The files are opened before the mount table (which makes
 * /proc/sys read-only) and written after it (whose open_tree() calls each
 * make a mount namespace of their own, which max_mnt_namespaces = 0 forbids).
 */
static long open_user_counters(const struct nsx_plan *plan, int *fds, const char **failed)
{
    const struct nsx_counter *c =
        (const struct nsx_counter *)((const char *)plan + plan->user_counters);
    int i;

    for (i = 0; i < plan->n_user_counters; i++) {
        *failed = nsx_plan_str(plan, c[i].path);
        if ((fds[i] = open(*failed, O_WRONLY | O_CLOEXEC)) < 0)
            return -errno;
    }
    return 0;
}

static long write_user_counters(const struct nsx_plan *plan, int *fds, const char **failed)
{
    const struct nsx_counter *c =
        (const struct nsx_counter *)((const char *)plan + plan->user_counters);
    long rc = 0;
    int i;

    for (i = 0; i < plan->n_user_counters; i++) {
        const char *value = nsx_plan_str(plan, c[i].value);

        if (rc >= 0) {
            *failed = nsx_plan_str(plan, c[i].path);
            rc = nsx_rc(write(fds[i], value, strlen(value)));
        }
        close(fds[i]);
    }
    return rc < 0 ? rc : 0;
}

static long set_rlimits(const struct nsx_plan *plan)
{
    const struct nsx_rlimit *r =
        (const struct nsx_rlimit *)((const char *)plan + plan->rlimits);
    struct rlimit lim;
    int i;

    for (i = 0; i < plan->n_rlimits; i++) {
        lim.rlim_cur = r[i].soft;
        lim.rlim_max = r[i].hard;
        if (setrlimit(r[i].resource, &lim) < 0)
            return -errno;
    }
    return 0;
}

static void run_mount_table(const struct nsx_plan *plan, int fd)
{
    const struct nsx_mount *mounts =
        (const struct nsx_mount *)((const char *)plan + plan->mounts);
    char what[NSX_DETAIL_MAX];
    long rc;
    int i;

    for (i = 0; i < plan->n_mounts; i++) {
        const struct nsx_mount *m = &mounts[i];
        const char *source = nsx_plan_str(plan, m->source);

        rc = nsx_checked(plan, NSX_STEP_MOUNT, nsx_run_mount_op(plan, m));
        if (rc >= 0 || ((m->flags & NSX_MNT_OPTIONAL) && rc == -ENOENT) ||
            ((m->flags & NSX_MNT_REACHABLE) && rc == -EACCES))
            continue;
        if (m->op == NSX_MNT_MOUNT || m->op == NSX_MNT_SYMLINK || m->op == NSX_MNT_BIND)
            snprintf(what, sizeof(what), "%s %s on", nsx_mount_op_name(m->op),
                     source ? source : nsx_plan_str(plan, m->fstype));
        else
            snprintf(what, sizeof(what), "%s", nsx_mount_op_name(m->op));
        nsx_bail(fd, NSX_STAGE_GRANDCHILD, NSX_STEP_MOUNT, rc, what,
                 nsx_plan_str(plan, m->target), 0);
    }
}

/*
 * Give the command exactly the fds it was promised and nothing else. Sources
 * first move above every target so that no dup3 overwrites a source that is
 * still needed; then every fd that is not a target is closed (the sync
 * socket is a target too, close-on-exec).
 */
static long setup_fds(struct nsx_start *start)
{
    const struct nsx_plan *plan = start->plan;
    const struct nsx_fdmap *map = (const struct nsx_fdmap *)((const char *)plan + plan->fds);
    int tmp[NSX_MAX_FDS], is_target[NSX_MAX_FDS];
    int top = plan->sync_target_fd, tmp_sync, i, fd;

    for (i = 0; i < plan->n_fds; i++)
        if (map[i].dst > top)
            top = map[i].dst;
    for (i = 0; i < plan->n_fds; i++)
        if ((tmp[i] = fcntl(start->fds[map[i].src], F_DUPFD_CLOEXEC, top + 1)) < 0)
            return -errno;
    if ((tmp_sync = fcntl(start->sync_fd, F_DUPFD_CLOEXEC, top + 1)) < 0)
        return -errno;

    memset(is_target, 0, sizeof(is_target));
    for (i = 0; i < plan->n_fds; i++) {
        /* without O_CLOEXEC: the command inherits these */
        if (dup3(tmp[i], map[i].dst, 0) < 0)
            return -errno;
        is_target[map[i].dst] = 1;
    }
    if (dup3(tmp_sync, plan->sync_target_fd, O_CLOEXEC) < 0)
        return -errno;
    is_target[plan->sync_target_fd] = 1;
    start->sync_fd = plan->sync_target_fd;
    for (fd = 0; fd <= top; fd++)
        if (!is_target[fd])
            close(fd);
    return nsx_rc(close_range((unsigned)top + 1, ~0U, 0));
}

/* Every handler back to the default (the server's SIG_IGN of SIGPIPE too). */
static long reset_signals(void)
{
    struct sigaction dfl;
    int sig;

    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    for (sig = 1; sig < NSIG; sig++)
        if (sigaction(sig, &dfl, NULL) < 0 && errno != EINVAL)  /* KILL, STOP, libc's */
            return -errno;
    return 0;
}

static long load_seccomp(const struct nsx_plan *plan)
{
    struct sock_fprog prog;

    prog.len = (unsigned short)plan->seccomp_len;
    prog.filter = (struct sock_filter *)((const char *)plan + plan->seccomp);
    return nsx_rc(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0));
}

#define STEP(step, call, what, path)                                            \
    do {                                                                        \
        long rc_ = nsx_checked(plan, step, (call));                             \
        if (rc_ < 0)                                                            \
            nsx_bail(start->sync_fd, NSX_STAGE_GRANDCHILD, step, rc_, what, path, 0); \
    } while (0)

_Noreturn void nsx_run_grandchild(struct nsx_start *start)
{
    const struct nsx_plan *plan = start->plan;
    const char *hostname = nsx_plan_str(plan, plan->hostname);
    const char *cwd = nsx_plan_str(plan, plan->cwd);
    int counter_fds[NSX_MAX_COUNTERS];
    const char *counter = NULL;
    long rc;

    rc = nsx_checked(plan, NSX_STEP_WAIT_GRANDCHILD,
                     nsx_wait_sync(start->sync_fd, NSX_SYNC_GRANDCHILD));
    if (rc == -EPIPE)
        _exit(1);  /* the Parent gave up on this sandbox */
    if (rc < 0)
        nsx_bail(start->sync_fd, NSX_STAGE_GRANDCHILD, NSX_STEP_WAIT_GRANDCHILD, rc,
                 "wait for SYNC_GRANDCHILD", NULL, 0);
    STEP(NSX_STEP_SETSID, nsx_rc(setsid()), "setsid", NULL);
    STEP(NSX_STEP_SET_IDS, set_ids(plan), "set uid, gid and groups", NULL);
    /* Dies with the Parent's thread (changing credentials cleared it). Had
     * the Parent died before, SYNC_CHILD_READY below fails. */
    STEP(NSX_STEP_PDEATHSIG, nsx_rc(prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)),
         "prctl(PR_SET_PDEATHSIG)", NULL);
    /* Last namespace: its root is the cgroup the Parent put us in. */
    if (plan->unshare_cgroup)
        STEP(NSX_STEP_UNSHARE_CGROUP, nsx_rc(unshare(CLONE_NEWCGROUP)),
             "unshare(CLONE_NEWCGROUP)", NULL);
    if (plan->loopback_up)
        STEP(NSX_STEP_LOOPBACK, loopback_up(), "bring up the loopback interface", NULL);
    STEP(NSX_STEP_USER_COUNTERS, open_user_counters(plan, counter_fds, &counter), "open",
         counter);
    run_mount_table(plan, start->sync_fd);
    STEP(NSX_STEP_USER_COUNTERS, write_user_counters(plan, counter_fds, &counter), "write",
         counter);
    if (hostname)
        STEP(NSX_STEP_HOSTNAME, nsx_rc(sethostname(hostname, strlen(hostname))),
             "sethostname", hostname);
    if (cwd)
        STEP(NSX_STEP_CHDIR, nsx_rc(chdir(cwd)), "chdir to", cwd);
    STEP(NSX_STEP_FDS, setup_fds(start), "set up fds", NULL);
    STEP(NSX_STEP_FDS, reset_signals(), "reset signal handlers", NULL);
    STEP(NSX_STEP_RLIMITS, set_rlimits(plan), "setrlimit", NULL);
    STEP(NSX_STEP_NO_NEW_PRIVS, nsx_rc(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)),
         "prctl(PR_SET_NO_NEW_PRIVS)", NULL);
    STEP(NSX_STEP_DROP_CAPS, drop_caps(), "drop capabilities", NULL);
    /* seccomp last: nothing after it but the report and the command. */
    if (plan->seccomp)
        STEP(NSX_STEP_SECCOMP, load_seccomp(plan), "install the seccomp filter", NULL);
    STEP(NSX_STEP_SEND_GRANDCHILD_READY,
         nsx_send_sync(start->sync_fd, NSX_SYNC_CHILD_READY, 0, 0), "send SYNC_CHILD_READY",
         NULL);
    if (plan->init)
        nsx_become_init(start->argv, start->sync_fd, plan);
    STEP(NSX_STEP_EXEC, 0, "exec", start->argv[0]);  /* the fault switch only */
    nsx_exec_command(start->argv, start->sync_fd, NSX_STAGE_GRANDCHILD, NSX_STEP_EXEC);
}
