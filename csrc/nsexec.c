/*
 * The clone stages of the sandbox: the seed's Child and GrandChild.
 *
 * nsx_clone_child() runs in the Jupyter server (the Parent), on the event
 * loop's thread, and clones the Child. Everything after that clone runs in a
 * copy of a multi-threaded process, so it follows the discipline of CPython's
 * _posixsubprocess.c: no malloc, no stdio, no locks, no glibc wrappers that
 * talk to other threads (the set*id calls are raw syscalls for that reason).
 * Every buffer it reads was built by Python before the clone. A failure is
 * sent to the Parent as one struct nsx_msg and the stage exits.
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
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "nsexec.h"
#include "nsmount.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

#define NSX_MAX_FDS 64
#define NSX_GRANDCHILD_STACK (64 * 1024)

/* ---- talking to the Parent --------------------------------------------- */

static void append(char *buf, size_t *len, const char *s)
{
    while (s && *s && *len + 1 < NSX_DETAIL_MAX)
        buf[(*len)++] = *s++;
    buf[*len] = '\0';
}

static int send_msg(int fd, const struct nsx_msg *msg)
{
    ssize_t n;

    do {
        n = send(fd, msg, sizeof(*msg), MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof(*msg) ? 0 : -1;
}

static int send_sync(int fd, int type, int pid0, int pid1)
{
    struct nsx_msg msg;

    memset(&msg, 0, sizeof(msg));
    msg.type = type;
    msg.pid[0] = pid0;
    msg.pid[1] = pid1;
    return send_msg(fd, &msg);
}

/* Wait for one message of the given type; EOF or anything else is an error. */
static int wait_sync(int fd, int type)
{
    struct nsx_msg msg;
    ssize_t n;

    do {
        n = recv(fd, &msg, sizeof(msg), 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -1;
    if (n != (ssize_t)sizeof(msg) || msg.type != type) {
        errno = n == 0 ? EPIPE : EPROTO;
        return -1;
    }
    return 0;
}

/*
 * Report a failure and exit. `grandchild` is the GrandChild's pid when the
 * Child fails after cloning it: the Parent must reap it, and this record is
 * the only way it learns the pid.
 */
static _Noreturn void bail_pid(int fd, int stage, int step, const char *what,
                               const char *path, long grandchild)
{
    struct nsx_msg msg;
    size_t len = 0;

    memset(&msg, 0, sizeof(msg));
    msg.type = NSX_SYNC_ERROR;
    msg.pid[1] = (int32_t)grandchild;
    msg.stage = stage;
    msg.step = step;
    msg.err = errno;
    append(msg.detail, &len, what);
    if (path) {
        append(msg.detail, &len, " ");
        append(msg.detail, &len, path);
    }
    send_msg(fd, &msg);
    _exit(1);
}

static _Noreturn void bail(int fd, int stage, int step, const char *what, const char *path)
{
    bail_pid(fd, stage, step, what, path, 0);
}

/* The test-only fault switch: pretend that this step failed with EIO. */
static int fault(const struct nsx_config *cfg, int step)
{
    if (cfg->fault_step != step)
        return 0;
    errno = EIO;
    return 1;
}

/* ---- small syscall wrappers --------------------------------------------- */

static int set_dumpable(int on)
{
    return prctl(PR_SET_DUMPABLE, on, 0, 0, 0);
}

static int reset_signals(void)
{
    struct sigaction sa;
    sigset_t none;
    int sig;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_DFL;
    for (sig = 1; sig < NSIG; sig++)
        sigaction(sig, &sa, NULL);  /* EINVAL for SIGKILL, SIGSTOP, libc's own */
    sigemptyset(&none);
    return sigprocmask(SIG_SETMASK, &none, NULL);
}

static int capset_all(int from_permitted)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    int i;

    if (syscall(SYS_capget, &hdr, data) < 0)
        return -1;
    for (i = 0; i < 2; i++) {
        data[i].effective = from_permitted ? data[i].permitted : 0;
        if (!from_permitted) {
            data[i].permitted = 0;
            data[i].inheritable = 0;
        }
    }
    return (int)syscall(SYS_capset, &hdr, data);
}

/*
 * The identity is already mapped, so these calls only settle the saved and
 * effective ids (and drop the server's supplementary groups where setgroups
 * is allowed). KEEPCAPS keeps the capabilities the mounts below still need
 * when a namespace root becomes an ordinary user.
 */
static int set_ids(const struct nsx_config *cfg)
{
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
        return -1;
    if (cfg->drop_groups && syscall(SYS_setgroups, 0, NULL) < 0)
        return -1;
    if (syscall(SYS_setresgid, cfg->gid, cfg->gid, cfg->gid) < 0)
        return -1;
    if (syscall(SYS_setresuid, cfg->uid, cfg->uid, cfg->uid) < 0)
        return -1;
    if (capset_all(1) < 0)
        return -1;
    return prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0);
}

static int drop_caps(void)
{
    int cap;

    for (cap = 0; cap < 64; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            return -1;
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 &&
        errno != EINVAL)
        return -1;
    return capset_all(0);
}

/* A new network namespace has only lo, and it is down. */
static int loopback_up(void)
{
    struct ifreq ifr;
    int sock, ret;

    sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -1;
    memset(&ifr, 0, sizeof(ifr));
    memcpy(ifr.ifr_name, "lo", 3);
    ret = ioctl(sock, SIOCGIFFLAGS, &ifr);
    if (ret == 0) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        ret = ioctl(sock, SIOCSIFFLAGS, &ifr);
    }
    close(sock);
    return ret;
}

static void run_mount_table(const struct nsx_config *cfg, int fd)
{
    char what[NSX_DETAIL_MAX];
    size_t len;
    int i;

    for (i = 0; i < cfg->n_mounts; i++) {
        const struct nsx_mount *m = &cfg->mounts[i];

        if (fault(cfg, NSX_STEP_MOUNT) || nsx_run_mount_op(m) < 0) {
            if ((m->flags & NSX_MNT_OPTIONAL) && errno == ENOENT)
                continue;
            len = 0;
            what[0] = '\0';
            append(what, &len, nsx_mount_op_name(m->op));
            if (m->op == NSX_MNT_MOUNT || m->op == NSX_MNT_SYMLINK || m->op == NSX_MNT_BIND) {
                append(what, &len, " ");
                append(what, &len, m->source ? m->source : m->fstype);
                append(what, &len, " on");
            }
            bail(fd, NSX_STAGE_GRANDCHILD, NSX_STEP_MOUNT, what, m->target);
        }
    }
}

/*
 * Give the command exactly the fds it was promised and nothing else. Sources
 * first move above every target so that no dup2 overwrites a source that is
 * still needed; then every fd that is not a target is closed (the sync socket
 * and the init's memfd are targets too, close-on-exec).
 */
static int setup_fds(const struct nsx_config *cfg, int *sync_fd, int *exec_fd)
{
    int tmp[NSX_MAX_FDS], is_target[NSX_MAX_FDS + 2];
    int top, i, fd, tmp_sync, tmp_exec = -1;
    int exec_target = cfg->sync_target_fd + 1;

    if (cfg->n_fds > NSX_MAX_FDS || cfg->sync_target_fd >= NSX_MAX_FDS) {
        errno = EMFILE;
        return -1;
    }
    top = exec_target;
    for (i = 0; i < cfg->n_fds; i++)
        if (cfg->fds[i].dst > top)
            top = cfg->fds[i].dst;
    if (top >= NSX_MAX_FDS + 2) {
        errno = EMFILE;
        return -1;
    }
    for (i = 0; i < cfg->n_fds; i++)
        if ((tmp[i] = fcntl(cfg->fds[i].src, F_DUPFD_CLOEXEC, top + 1)) < 0)
            return -1;
    if ((tmp_sync = fcntl(*sync_fd, F_DUPFD_CLOEXEC, top + 1)) < 0)
        return -1;
    if (*exec_fd >= 0 && (tmp_exec = fcntl(*exec_fd, F_DUPFD_CLOEXEC, top + 1)) < 0)
        return -1;

    memset(is_target, 0, sizeof(is_target));
    for (i = 0; i < cfg->n_fds; i++) {
        if (dup2(tmp[i], cfg->fds[i].dst) < 0)
            return -1;
        is_target[cfg->fds[i].dst] = 1;
    }
    if (dup3(tmp_sync, cfg->sync_target_fd, O_CLOEXEC) < 0)
        return -1;
    is_target[cfg->sync_target_fd] = 1;
    *sync_fd = cfg->sync_target_fd;
    if (tmp_exec >= 0) {
        if (dup3(tmp_exec, exec_target, O_CLOEXEC) < 0)
            return -1;
        is_target[exec_target] = 1;
        *exec_fd = exec_target;
    }
    for (fd = 0; fd <= top; fd++)
        if (!is_target[fd])
            close(fd);
    if (syscall(SYS_close_range, top + 1, ~0U, 0) == 0)
        return 0;
    for (fd = top + 1; fd < 65536; fd++)  /* before Linux 5.9 */
        close(fd);
    return 0;
}

static void exec_program(const struct nsx_config *cfg, int exec_fd)
{
    if (exec_fd >= 0) {
        syscall(SYS_execveat, exec_fd, "", cfg->argv, cfg->envp, AT_EMPTY_PATH);
        /* memfd exec refused (vm.memfd_noexec, noexec policy): use the file */
    }
    execve(cfg->exec_path, cfg->argv, cfg->envp);
}

/* ---- GrandChild (stage 2): becomes PID 1 of the sandbox ----------------- */

#define STEP(step, call, what, path)                                  \
    do {                                                              \
        if ((call) < 0 || fault(cfg, step))                           \
            bail(fd, NSX_STAGE_GRANDCHILD, step, what, path);         \
    } while (0)

static _Noreturn void run_grandchild(const struct nsx_config *cfg)
{
    int fd = cfg->grandchild_sync_fd;
    int exec_fd = cfg->exec_fd;
    struct sock_fprog prog;

    close(cfg->child_sync_fd);
    /* Dies with the Parent's thread; EOF on the socket covers the moment
     * before this call. */
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);

    if (wait_sync(fd, NSX_SYNC_GRANDCHILD) < 0 || fault(cfg, NSX_STEP_WAIT_GRANDCHILD)) {
        if (errno == EPIPE)
            _exit(1);  /* the Parent gave up on this sandbox */
        bail(fd, NSX_STAGE_GRANDCHILD, NSX_STEP_WAIT_GRANDCHILD,
             "wait for SYNC_GRANDCHILD", NULL);
    }
    STEP(NSX_STEP_SETSID, setsid(), "setsid", NULL);
    STEP(NSX_STEP_SET_IDS, set_ids(cfg), "set uid, gid and groups", NULL);
    /* Changing credentials cleared the parent-death signal. */
    STEP(NSX_STEP_PDEATHSIG, prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0),
         "prctl(PR_SET_PDEATHSIG)", NULL);
    /* Last namespace: its root is the cgroup the Parent put us in. */
    if (cfg->unshare_cgroup)
        STEP(NSX_STEP_UNSHARE_CGROUP, unshare(CLONE_NEWCGROUP),
             "unshare(CLONE_NEWCGROUP)", NULL);
    if (cfg->loopback_up)
        STEP(NSX_STEP_LOOPBACK, loopback_up(), "bring up the loopback interface", NULL);
    run_mount_table(cfg, fd);
    if (cfg->hostname)
        STEP(NSX_STEP_HOSTNAME, sethostname(cfg->hostname, strlen(cfg->hostname)),
             "sethostname", cfg->hostname);
    if (cfg->cwd)
        STEP(NSX_STEP_CHDIR, chdir(cfg->cwd), "chdir to", cfg->cwd);
    STEP(NSX_STEP_FDS, setup_fds(cfg, &fd, &exec_fd), "set up fds", NULL);
    STEP(NSX_STEP_FDS, reset_signals(), "reset signal handlers", NULL);
    if (cfg->no_new_privs)
        STEP(NSX_STEP_NO_NEW_PRIVS, prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
             "prctl(PR_SET_NO_NEW_PRIVS)", NULL);
    if (cfg->drop_caps)
        STEP(NSX_STEP_DROP_CAPS, drop_caps(), "drop capabilities", NULL);
    /* seccomp last: nothing after it but the report and the exec. */
    if (cfg->seccomp_filter) {
        prog.len = cfg->seccomp_len;
        prog.filter = (struct sock_filter *)cfg->seccomp_filter;
        STEP(NSX_STEP_SECCOMP, prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0),
             "install the seccomp filter", NULL);
    }
    STEP(NSX_STEP_SEND_GRANDCHILD_READY, send_sync(fd, NSX_SYNC_CHILD_READY, 0, 0),
         "send SYNC_CHILD_READY", NULL);
    if (cfg->sync_keep_on_exec)
        STEP(NSX_STEP_EXEC, fcntl(fd, F_SETFD, 0), "hand the sync socket to the init",
             NULL);
    if (fault(cfg, NSX_STEP_EXEC))
        bail(fd, NSX_STAGE_GRANDCHILD, NSX_STEP_EXEC, "exec", cfg->exec_path);
    exec_program(cfg, exec_fd);
    bail(fd, NSX_STAGE_GRANDCHILD, NSX_STEP_EXEC, "exec", cfg->exec_path);
}

#undef STEP

/* ---- Child (stage 1) ------------------------------------------------------ */

#define STEP(step, call, what)                                        \
    do {                                                              \
        if ((call) < 0 || fault(cfg, step))                           \
            bail_pid(fd, NSX_STAGE_CHILD, step, what, NULL, grandchild); \
    } while (0)

static int grandchild_main(void *cfg)
{
    run_grandchild(cfg);
}

static _Noreturn void run_child(const struct nsx_config *cfg)
{
    char grandchild_stack[NSX_GRANDCHILD_STACK] __attribute__((aligned(16)));
    int fd = cfg->child_sync_fd;
    long grandchild = 0;

    /* Our copies of the Parent's ends would hide the Parent's death. */
    close(cfg->parent_sync_fds[0]);
    close(cfg->parent_sync_fds[1]);
    prctl(PR_SET_NAME, "nsprov[1:CHILD]", 0, 0, 0);
    STEP(NSX_STEP_CHILD_SETUP, prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0),
         "prctl(PR_SET_PDEATHSIG)");
    STEP(NSX_STEP_CHILD_SETUP, set_dumpable(0), "prctl(PR_SET_DUMPABLE)");

    STEP(NSX_STEP_UNSHARE_USER, unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)");
    /* An unprivileged Parent can write our maps only while we are dumpable. */
    STEP(NSX_STEP_SEND_USERMAP_PLS, set_dumpable(1), "prctl(PR_SET_DUMPABLE)");
    STEP(NSX_STEP_SEND_USERMAP_PLS, send_sync(fd, NSX_SYNC_USERMAP_PLS, 0, 0),
         "send SYNC_USERMAP_PLS");
    STEP(NSX_STEP_WAIT_USERMAP_ACK, wait_sync(fd, NSX_SYNC_USERMAP_ACK),
         "wait for SYNC_USERMAP_ACK");
    STEP(NSX_STEP_WAIT_USERMAP_ACK, set_dumpable(0), "prctl(PR_SET_DUMPABLE)");

    /* Everything but cgroup: the GrandChild unshares that once it is in
     * its final cgroup. */
    STEP(NSX_STEP_UNSHARE_NAMESPACES, unshare(cfg->unshare_flags),
         "unshare the pid, mount, ipc, uts and net namespaces");

    /*
     * CLONE_PARENT: the GrandChild is the Parent's child, which can hold a
     * pidfd on it and reap it, while the new pid namespace makes it PID 1.
     * CLONE_VM: it shares our copy of the server's memory instead of making
     * a second one (we only exit from here on), and runs on its own stack,
     * which lives in this frame because this function never returns.
     */
    if (fault(cfg, NSX_STEP_CLONE_GRANDCHILD)) {
        grandchild = -1;
    } else {
        /* named before the clone, so that it carries its name from birth */
        prctl(PR_SET_NAME, "nsprov[2:INIT]", 0, 0, 0);
        grandchild = clone(grandchild_main, grandchild_stack + sizeof(grandchild_stack),
                           CLONE_PARENT | CLONE_VM | SIGCHLD, (void *)cfg);
        prctl(PR_SET_NAME, "nsprov[1:CHILD]", 0, 0, 0);
    }
    if (grandchild < 0)
        bail(fd, NSX_STAGE_CHILD, NSX_STEP_CLONE_GRANDCHILD, "clone the grandchild", NULL);
    /* from here on every failure report carries the GrandChild's pid */
    close(cfg->grandchild_sync_fd);

    STEP(NSX_STEP_SEND_RECVPID_PLS,
         send_sync(fd, NSX_SYNC_RECVPID_PLS, (int)syscall(SYS_getpid), (int)grandchild),
         "send SYNC_RECVPID_PLS");
    STEP(NSX_STEP_WAIT_RECVPID_ACK, wait_sync(fd, NSX_SYNC_RECVPID_ACK),
         "wait for SYNC_RECVPID_ACK");
    STEP(NSX_STEP_SEND_CHILD_READY, send_sync(fd, NSX_SYNC_CHILD_READY, 0, 0),
         "send SYNC_CHILD_READY");
    _exit(0);
}

#undef STEP

/* ---- Parent ----------------------------------------------------------------- */

int nsx_clone_child(const struct nsx_config *cfg, int *pidfd, int *into_cgroup)
{
    struct clone_args args;
    sigset_t all, old;
    long pid;
    int saved;

    *pidfd = -1;
    *into_cgroup = 0;
    memset(&args, 0, sizeof(args));
    args.flags = CLONE_PIDFD | CLONE_CLEAR_SIGHAND;
    args.pidfd = (uint64_t)(uintptr_t)pidfd;
    args.exit_signal = SIGCHLD;
    if (cfg->cgroup_fd >= 0) {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)cfg->cgroup_fd;
    }

    /* No handler of the server may run in the Child, not even once. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = syscall(SYS_clone3, &args, sizeof(args));
    if (pid < 0 && errno == ENOSYS && cfg->cgroup_fd < 0) {
        /* Before Linux 5.3: clone with a pidfd, handlers reset by hand. */
        pid = syscall(SYS_clone, CLONE_PIDFD | SIGCHLD, 0, pidfd, 0, 0);
        if (pid == 0) {
            struct sigaction sa;
            int sig;

            memset(&sa, 0, sizeof(sa));
            for (sig = 1; sig < NSIG; sig++) {
                if (sigaction(sig, NULL, &sa) == 0 && sa.sa_handler != SIG_IGN &&
                    sa.sa_handler != SIG_DFL) {
                    sa.sa_handler = SIG_DFL;
                    sigaction(sig, &sa, NULL);
                }
            }
        }
    }
    if (pid == 0) {
        sigset_t none;

        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        run_child(cfg);
    }
    saved = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0)
        return -saved;
    *into_cgroup = cfg->cgroup_fd >= 0;
    return (int)pid;
}
