/*
 * The clone stages of the sandbox: the seed's Child and GrandChild.
 *
 * nsx_clone_child() (nsclone.c) clones the Child from the Jupyter server
 * (the Parent), on the event loop's thread. Everything here runs after that
 * clone, in the server's own memory (see nsxsys.h; or in a copy, when
 * cfg->share_memory is off), while the server goes on: so it follows and
 * tightens the discipline of CPython's
 * _posixsubprocess.c: no malloc, no stdio, no locks, and no libc call at all
 * but the pure string functions; every syscall is raw and returns -errno.
 * Every buffer it reads was built by Python before the clone and stays
 * untouched until both stages are gone. A failure is sent to the Parent as
 * one struct nsx_msg and the stage exits.
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
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>

#include "nsexec.h"
#include "nsexec_stages.h"
#include "nsmount.h"
#include "nsnet.h"
#include "nsxsys.h"

#define NSX_MAX_FDS 64
#define NSX_MAX_COUNTERS 16
#define NSX_GRANDCHILD_STACK (64 * 1024)
/* the kernel's sigset_t, as rt_sigaction and rt_sigprocmask take it */
#define NSX_SIGSET_SIZE ((NSIG - 1) / 8)

/* ---- talking to the Parent --------------------------------------------- */

static void append(char *buf, size_t *len, const char *s)
{
    while (s && *s && *len + 1 < NSX_DETAIL_MAX)
        buf[(*len)++] = *s++;
    buf[*len] = '\0';
}

static long send_msg(int fd, const struct nsx_msg *msg)
{
    long n;

    do {
        n = NSX_SYS6(SYS_sendto, fd, msg, sizeof(*msg), MSG_NOSIGNAL, NULL, 0);
    } while (n == -EINTR);
    if (n < 0)
        return n;
    return n == (long)sizeof(*msg) ? 0 : -EPROTO;
}

static long send_sync(int fd, int type, int pid0, int pid1)
{
    struct nsx_msg msg;

    memset(&msg, 0, sizeof(msg));
    msg.type = type;
    msg.pid[0] = pid0;
    msg.pid[1] = pid1;
    return send_msg(fd, &msg);
}

/* Wait for one message of the given type; EOF is -EPIPE, anything else -EPROTO. */
static long wait_sync(int fd, int type)
{
    struct nsx_msg msg;
    long n;

    do {
        n = NSX_SYS6(SYS_recvfrom, fd, &msg, sizeof(msg), 0, NULL, NULL);
    } while (n == -EINTR);
    if (n < 0)
        return n;
    if (n == 0)
        return -EPIPE;
    return n == (long)sizeof(msg) && msg.type == type ? 0 : -EPROTO;
}

/*
 * Report a failure and exit. `grandchild` is the GrandChild's pid when the
 * Child fails after cloning it: the Parent must reap it, and this record
 * tells it the pid (in fork mode the only way it learns it).
 */
static _Noreturn void bail_pid(int fd, int stage, int step, long err, const char *what,
                               const char *path, long grandchild)
{
    struct nsx_msg msg;
    size_t len = 0;

    memset(&msg, 0, sizeof(msg));
    msg.type = NSX_SYNC_ERROR;
    msg.pid[1] = (int32_t)grandchild;
    msg.stage = stage;
    msg.step = step;
    msg.err = (int32_t)(err < 0 ? -err : err);
    append(msg.detail, &len, what);
    if (path) {
        append(msg.detail, &len, " ");
        append(msg.detail, &len, path);
    }
    send_msg(fd, &msg);
    nsx_exit(1);
}

static _Noreturn void bail(int fd, int stage, int step, long err, const char *what,
                           const char *path)
{
    bail_pid(fd, stage, step, err, what, path, 0);
}

/*
 * A step's result, through the test-only fault switch: a step that
 * succeeded fails with EIO when it is the one named in cfg->fault_step.
 */
static long checked(const struct nsx_config *cfg, int step, long rc)
{
    return rc >= 0 && cfg->fault_step == step ? -EIO : rc;
}

/* ---- small steps ------------------------------------------------------------ */

static long prctl2(int option, unsigned long arg)
{
    return NSX_SYS5(SYS_prctl, option, arg, 0, 0, 0);
}

/* Every handler back to the default (the server's SIG_IGN of SIGPIPE too),
 * then unblock. */
static long reset_signals(void)
{
    unsigned long kact[4] = {0, 0, 0, 0};  /* handler SIG_DFL, no flags, empty mask */
    unsigned long none[2] = {0, 0};
    long rc;
    int sig;

    for (sig = 1; sig < NSIG; sig++) {
        rc = NSX_SYS4(SYS_rt_sigaction, sig, kact, NULL, NSX_SIGSET_SIZE);
        if (rc < 0 && rc != -EINVAL)  /* EINVAL: SIGKILL, SIGSTOP */
            return rc;
    }
    return NSX_SYS4(SYS_rt_sigprocmask, SIG_SETMASK, none, NULL, NSX_SIGSET_SIZE);
}

static long capset_all(int from_permitted)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    long rc;
    int i;

    if ((rc = NSX_SYS2(SYS_capget, &hdr, data)) < 0)
        return rc;
    for (i = 0; i < 2; i++) {
        data[i].effective = from_permitted ? data[i].permitted : 0;
        if (!from_permitted) {
            data[i].permitted = 0;
            data[i].inheritable = 0;
        }
    }
    return NSX_SYS2(SYS_capset, &hdr, data);
}

/*
 * The identity is already mapped, so these calls only settle the saved and
 * effective ids (and drop the server's supplementary groups where setgroups
 * is allowed). KEEPCAPS keeps the capabilities the mounts below still need
 * when a namespace root becomes an ordinary user. (Raw calls also because
 * libc's set*id would try to change every thread of the server.)
 */
static long set_ids(const struct nsx_config *cfg)
{
    long rc;

    if ((rc = prctl2(PR_SET_KEEPCAPS, 1)) < 0)
        return rc;
    if (cfg->drop_groups && (rc = NSX_SYS2(SYS_setgroups, 0, NULL)) < 0)
        return rc;
    if ((rc = NSX_SYS3(SYS_setresgid, cfg->gid, cfg->gid, cfg->gid)) < 0)
        return rc;
    if ((rc = NSX_SYS3(SYS_setresuid, cfg->uid, cfg->uid, cfg->uid)) < 0)
        return rc;
    if ((rc = capset_all(1)) < 0)
        return rc;
    return prctl2(PR_SET_KEEPCAPS, 0);
}

static long drop_caps(void)
{
    long rc;
    int cap;

    for (cap = 0; cap < 64; cap++)
        if ((rc = prctl2(PR_CAPBSET_DROP, (unsigned long)cap)) < 0 && rc != -EINVAL)
            return rc;
    rc = NSX_SYS5(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    if (rc < 0 && rc != -EINVAL)
        return rc;
    return capset_all(0);
}

/* A new network namespace has only lo, and it is down. */
static long loopback_up(void)
{
    struct ifreq ifr;
    long sock, rc;

    sock = NSX_SYS3(SYS_socket, AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return sock;
    memset(&ifr, 0, sizeof(ifr));
    memcpy(ifr.ifr_name, "lo", 3);
    rc = NSX_SYS3(SYS_ioctl, sock, SIOCGIFFLAGS, &ifr);
    if (rc == 0) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        rc = NSX_SYS3(SYS_ioctl, sock, SIOCSIFFLAGS, &ifr);
    }
    NSX_SYS1(SYS_close, sock);
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
static long open_user_counters(const struct nsx_config *cfg, int *fds, const char **failed)
{
    long fd;
    int i;

    if (cfg->n_user_counters > NSX_MAX_COUNTERS)
        return -E2BIG;
    for (i = 0; i < cfg->n_user_counters; i++) {
        *failed = cfg->user_counters[i].path;
        fd = NSX_SYS4(SYS_openat, AT_FDCWD, cfg->user_counters[i].path,
                      O_WRONLY | O_CLOEXEC, 0);
        if (fd < 0)
            return fd;
        fds[i] = (int)fd;
    }
    return 0;
}

static long write_user_counters(const struct nsx_config *cfg, int *fds, const char **failed)
{
    long rc = 0;
    int i;

    for (i = 0; i < cfg->n_user_counters; i++) {
        const char *value = cfg->user_counters[i].value;

        if (rc >= 0) {
            *failed = cfg->user_counters[i].path;
            rc = NSX_SYS3(SYS_write, fds[i], value, strlen(value));
        }
        NSX_SYS1(SYS_close, fds[i]);
        fds[i] = -1;
    }
    return rc < 0 ? rc : 0;
}

static long set_rlimits(const struct nsx_config *cfg)
{
    struct { uint64_t cur, max; } lim;
    long rc;
    int i;

    for (i = 0; i < cfg->n_rlimits; i++) {
        lim.cur = cfg->rlimits[i].soft;
        lim.max = cfg->rlimits[i].hard;
        if ((rc = NSX_SYS4(SYS_prlimit64, 0, cfg->rlimits[i].resource, &lim, NULL)) < 0)
            return rc;
    }
    return 0;
}

static void run_mount_table(const struct nsx_config *cfg, int fd)
{
    char what[NSX_DETAIL_MAX];
    size_t len;
    long rc;
    int i;

    for (i = 0; i < cfg->n_mounts; i++) {
        const struct nsx_mount *m = &cfg->mounts[i];

        rc = checked(cfg, NSX_STEP_MOUNT, nsx_run_mount_op(m));
        if (rc >= 0 || ((m->flags & NSX_MNT_OPTIONAL) && rc == -ENOENT)
            || ((m->flags & NSX_MNT_REACHABLE) && rc == -EACCES))
            continue;
        len = 0;
        what[0] = '\0';
        append(what, &len, nsx_mount_op_name(m->op));
        if (m->op == NSX_MNT_MOUNT || m->op == NSX_MNT_SYMLINK || m->op == NSX_MNT_BIND) {
            append(what, &len, " ");
            append(what, &len, m->source ? m->source : m->fstype);
            append(what, &len, " on");
        }
        bail(fd, NSX_STAGE_GRANDCHILD, NSX_STEP_MOUNT, rc, what, m->target);
    }
}

static long dup_above(int fd, int floor)
{
    return NSX_SYS3(SYS_fcntl, fd, F_DUPFD_CLOEXEC, floor);
}

/*
 * Give the command exactly the fds it was promised and nothing else. Sources
 * first move above every target so that no dup3 overwrites a source that is
 * still needed; then every fd that is not a target is closed (the sync socket
 * and the init's memfd are targets too, close-on-exec).
 */
static long setup_fds(const struct nsx_config *cfg, int *sync_fd, int *exec_fd)
{
    long tmp[NSX_MAX_FDS], tmp_sync, tmp_exec = -1, rc;
    int is_target[NSX_MAX_FDS + 2];
    int top, i, fd;
    int exec_target = cfg->sync_target_fd + 1;

    if (cfg->n_fds > NSX_MAX_FDS || cfg->sync_target_fd >= NSX_MAX_FDS)
        return -EMFILE;
    top = exec_target;
    for (i = 0; i < cfg->n_fds; i++)
        if (cfg->fds[i].dst > top)
            top = cfg->fds[i].dst;
    if (top >= NSX_MAX_FDS + 2)
        return -EMFILE;
    for (i = 0; i < cfg->n_fds; i++)
        if ((tmp[i] = dup_above(cfg->fds[i].src, top + 1)) < 0)
            return tmp[i];
    if ((tmp_sync = dup_above(*sync_fd, top + 1)) < 0)
        return tmp_sync;
    if (*exec_fd >= 0 && (tmp_exec = dup_above(*exec_fd, top + 1)) < 0)
        return tmp_exec;

    memset(is_target, 0, sizeof(is_target));
    for (i = 0; i < cfg->n_fds; i++) {
        /* without O_CLOEXEC: the command inherits these */
        if ((rc = NSX_SYS3(SYS_dup3, tmp[i], cfg->fds[i].dst, 0)) < 0)
            return rc;
        is_target[cfg->fds[i].dst] = 1;
    }
    if ((rc = NSX_SYS3(SYS_dup3, tmp_sync, cfg->sync_target_fd, O_CLOEXEC)) < 0)
        return rc;
    is_target[cfg->sync_target_fd] = 1;
    *sync_fd = cfg->sync_target_fd;
    if (tmp_exec >= 0) {
        if ((rc = NSX_SYS3(SYS_dup3, tmp_exec, exec_target, O_CLOEXEC)) < 0)
            return rc;
        is_target[exec_target] = 1;
        *exec_fd = exec_target;
    }
    for (fd = 0; fd <= top; fd++)
        if (!is_target[fd])
            NSX_SYS1(SYS_close, fd);
    if (NSX_SYS3(SYS_close_range, top + 1, ~0U, 0) == 0)
        return 0;
    for (fd = top + 1; fd < 65536; fd++)  /* before Linux 5.9 */
        NSX_SYS1(SYS_close, fd);
    return 0;
}

static long exec_program(const struct nsx_config *cfg, int exec_fd)
{
    if (exec_fd >= 0) {
        NSX_SYS5(SYS_execveat, exec_fd, "", cfg->argv, cfg->envp, AT_EMPTY_PATH);
        /* memfd exec refused (vm.memfd_noexec, noexec policy): use the file */
    }
    return NSX_SYS3(SYS_execve, cfg->exec_path, cfg->argv, cfg->envp);
}

/* ---- GrandChild (stage 2): becomes PID 1 of the sandbox ----------------- */

#define STEP(step, call, what, path)                                          \
    do {                                                                      \
        long rc_ = checked(cfg, step, (call));                                \
        if (rc_ < 0)                                                          \
            bail(fd, NSX_STAGE_GRANDCHILD, step, rc_, what, path);            \
    } while (0)

static _Noreturn void run_grandchild(const struct nsx_config *cfg)
{
    int fd = cfg->grandchild_sync_fd;
    int exec_fd = cfg->exec_fd;
    int counter_fds[NSX_MAX_COUNTERS];
    const char *counter = NULL;
    struct sock_fprog prog;
    long rc;

    NSX_SYS1(SYS_close, cfg->child_sync_fd);
    /* Dies with the Parent's thread; EOF on the socket covers the moment
     * before this call. */
    prctl2(PR_SET_PDEATHSIG, SIGKILL);

    rc = checked(cfg, NSX_STEP_WAIT_GRANDCHILD, wait_sync(fd, NSX_SYNC_GRANDCHILD));
    if (rc == -EPIPE)
        nsx_exit(1);  /* the Parent gave up on this sandbox */
    if (rc < 0)
        bail(fd, NSX_STAGE_GRANDCHILD, NSX_STEP_WAIT_GRANDCHILD, rc,
             "wait for SYNC_GRANDCHILD", NULL);
    STEP(NSX_STEP_SETSID, NSX_SYS0(SYS_setsid), "setsid", NULL);
    STEP(NSX_STEP_SET_IDS, set_ids(cfg), "set uid, gid and groups", NULL);
    /* Changing credentials cleared the parent-death signal. */
    STEP(NSX_STEP_PDEATHSIG, prctl2(PR_SET_PDEATHSIG, SIGKILL), "prctl(PR_SET_PDEATHSIG)",
         NULL);
    /* Last namespace: its root is the cgroup the Parent put us in. */
    if (cfg->unshare_cgroup)
        STEP(NSX_STEP_UNSHARE_CGROUP, NSX_SYS1(SYS_unshare, CLONE_NEWCGROUP),
             "unshare(CLONE_NEWCGROUP)", NULL);
    if (cfg->loopback_up)
        STEP(NSX_STEP_LOOPBACK, loopback_up(), "bring up the loopback interface", NULL);
    if (cfg->net)
        STEP(NSX_STEP_NETWORK, nsx_net_setup(cfg->net), "set up the egress network", NULL);
    STEP(NSX_STEP_USER_COUNTERS, open_user_counters(cfg, counter_fds, &counter), "open",
         counter);
    run_mount_table(cfg, fd);
    STEP(NSX_STEP_USER_COUNTERS, write_user_counters(cfg, counter_fds, &counter), "write",
         counter);
    if (cfg->hostname)
        STEP(NSX_STEP_HOSTNAME, NSX_SYS2(SYS_sethostname, cfg->hostname, strlen(cfg->hostname)),
             "sethostname", cfg->hostname);
    if (cfg->cwd)
        STEP(NSX_STEP_CHDIR, NSX_SYS1(SYS_chdir, cfg->cwd), "chdir to", cfg->cwd);
    STEP(NSX_STEP_FDS, setup_fds(cfg, &fd, &exec_fd), "set up fds", NULL);
    STEP(NSX_STEP_FDS, reset_signals(), "reset signal handlers", NULL);
    STEP(NSX_STEP_RLIMITS, set_rlimits(cfg), "setrlimit", NULL);
    if (cfg->no_new_privs)
        STEP(NSX_STEP_NO_NEW_PRIVS, prctl2(PR_SET_NO_NEW_PRIVS, 1),
             "prctl(PR_SET_NO_NEW_PRIVS)", NULL);
    if (cfg->drop_caps)
        STEP(NSX_STEP_DROP_CAPS, drop_caps(), "drop capabilities", NULL);
    /* seccomp last: nothing after it but the report and the exec. */
    if (cfg->seccomp_filter) {
        prog.len = cfg->seccomp_len;
        prog.filter = (struct sock_filter *)cfg->seccomp_filter;
        STEP(NSX_STEP_SECCOMP,
             NSX_SYS3(SYS_prctl, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog),
             "install the seccomp filter", NULL);
    }
    STEP(NSX_STEP_SEND_GRANDCHILD_READY, send_sync(fd, NSX_SYNC_CHILD_READY, 0, 0),
         "send SYNC_CHILD_READY", NULL);
    if (cfg->sync_keep_on_exec)
        STEP(NSX_STEP_EXEC, NSX_SYS3(SYS_fcntl, fd, F_SETFD, 0),
             "hand the sync socket to the init", NULL);
    STEP(NSX_STEP_EXEC, 0, "exec", cfg->exec_path);  /* the fault switch only */
    bail(fd, NSX_STAGE_GRANDCHILD, NSX_STEP_EXEC, exec_program(cfg, exec_fd), "exec",
         cfg->exec_path);
}

#undef STEP

/* ---- Child (stage 1) ------------------------------------------------------ */

#define STEP(step, call, what)                                                \
    do {                                                                      \
        long rc_ = checked(cfg, step, (call));                                \
        if (rc_ < 0)                                                          \
            bail_pid(fd, NSX_STAGE_CHILD, step, rc_, what, NULL, grandchild); \
    } while (0)

static int grandchild_main(void *cfg)
{
    run_grandchild(cfg);
}

/*
 * Sharing the server's memory, the Child must leave the dumpable flag alone
 * (it belongs to that memory, i.e. to the server); a copy of it is the
 * Child's own, and is kept non-dumpable except while the Parent writes the
 * maps, which it can do only while we are dumpable.
 */
static long set_dumpable(const struct nsx_config *cfg, int on)
{
    return cfg->share_memory ? 0 : prctl2(PR_SET_DUMPABLE, (unsigned long)on);
}

int nsx_run_child(void *arg)
{
    const struct nsx_config *cfg = arg;
    char grandchild_stack[NSX_GRANDCHILD_STACK] __attribute__((aligned(16)));
    struct clone_args args;
    int fd = cfg->child_sync_fd;
    long grandchild = 0;

    /* Our copies of the Parent's ends would hide the Parent's death. */
    NSX_SYS1(SYS_close, cfg->parent_sync_fds[0]);
    NSX_SYS1(SYS_close, cfg->parent_sync_fds[1]);
    prctl2(PR_SET_NAME, (unsigned long)"nsprov[1:CHILD]");
    STEP(NSX_STEP_CHILD_SETUP, prctl2(PR_SET_PDEATHSIG, SIGKILL), "prctl(PR_SET_PDEATHSIG)");
    STEP(NSX_STEP_CHILD_SETUP, set_dumpable(cfg, 0), "prctl(PR_SET_DUMPABLE)");

    STEP(NSX_STEP_UNSHARE_USER, NSX_SYS1(SYS_unshare, CLONE_NEWUSER),
         "unshare(CLONE_NEWUSER)");
    STEP(NSX_STEP_SEND_USERMAP_PLS, set_dumpable(cfg, 1), "prctl(PR_SET_DUMPABLE)");
    STEP(NSX_STEP_SEND_USERMAP_PLS, send_sync(fd, NSX_SYNC_USERMAP_PLS, 0, 0),
         "send SYNC_USERMAP_PLS");
    STEP(NSX_STEP_WAIT_USERMAP_ACK, wait_sync(fd, NSX_SYNC_USERMAP_ACK),
         "wait for SYNC_USERMAP_ACK");
    STEP(NSX_STEP_WAIT_USERMAP_ACK, set_dumpable(cfg, 0), "prctl(PR_SET_DUMPABLE)");

    /* Everything but cgroup: the GrandChild unshares that once it is in
     * its final cgroup. */
    STEP(NSX_STEP_UNSHARE_NAMESPACES, NSX_SYS1(SYS_unshare, cfg->unshare_flags),
         "unshare the pid, mount, ipc, uts and net namespaces");

    /*
     * CLONE_PARENT: the GrandChild is the Parent's child, which can hold a
     * pidfd on it and reap it, while the new pid namespace makes it PID 1
     * (its exit signal is ours, so clone3 wants none given). CLONE_VM: it
     * shares our memory instead of making a copy, on its own stack, which
     * lives in this frame because this function never returns.
     * CLONE_PARENT_SETTID: the kernel stores its pid where the Parent finds
     * it even if we die before reporting it (shared memory only).
     */
    memset(&args, 0, sizeof(args));
    args.flags = CLONE_PARENT | CLONE_VM | CLONE_PARENT_SETTID;
    args.parent_tid = (uint64_t)(uintptr_t)cfg->grandchild_tid;
    args.stack = (uint64_t)(uintptr_t)grandchild_stack;
    args.stack_size = sizeof(grandchild_stack);
    /* named before the clone, so that it carries its name from birth */
    prctl2(PR_SET_NAME, (unsigned long)"nsprov[2:INIT]");
    grandchild = cfg->fault_step == NSX_STEP_CLONE_GRANDCHILD
                     ? -EIO
                     : nsx_clone3(&args, sizeof(args), grandchild_main, (void *)cfg);
    prctl2(PR_SET_NAME, (unsigned long)"nsprov[1:CHILD]");
    if (grandchild < 0)
        bail(fd, NSX_STAGE_CHILD, NSX_STEP_CLONE_GRANDCHILD, grandchild,
             "clone the grandchild", NULL);
    /* from here on every failure report carries the GrandChild's pid */
    NSX_SYS1(SYS_close, cfg->grandchild_sync_fd);

    STEP(NSX_STEP_SEND_RECVPID_PLS,
         send_sync(fd, NSX_SYNC_RECVPID_PLS, (int)NSX_SYS0(SYS_getpid), (int)grandchild),
         "send SYNC_RECVPID_PLS");
    STEP(NSX_STEP_WAIT_RECVPID_ACK, wait_sync(fd, NSX_SYNC_RECVPID_ACK),
         "wait for SYNC_RECVPID_ACK");
    STEP(NSX_STEP_SEND_CHILD_READY, send_sync(fd, NSX_SYNC_CHILD_READY, 0, 0),
         "send SYNC_CHILD_READY");
    nsx_exit(0);
}

#undef STEP
