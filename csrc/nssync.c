/*
 * The helper's side of the conversation with the Parent: the sync records
 * of the seed's diagram, error records, the plan, and the test-only fault
 * switch.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nsstage.h"

long nsx_rc(long rc)
{
    return rc < 0 ? -errno : rc;
}

static long send_msg(int fd, const struct nsx_msg *msg)
{
    ssize_t n;

    do {
        n = send(fd, msg, sizeof(*msg), MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    return n == (ssize_t)sizeof(*msg) ? 0 : -EPROTO;
}

long nsx_send_sync(int fd, int type, int pid0, int pid1)
{
    struct nsx_msg msg;

    memset(&msg, 0, sizeof(msg));
    msg.type = type;
    msg.pid[0] = pid0;
    msg.pid[1] = pid1;
    return send_msg(fd, &msg);
}

/* Wait for one record of the given type; EOF is -EPIPE, anything else -EPROTO. */
long nsx_wait_sync(int fd, int type)
{
    struct nsx_msg msg;
    ssize_t n;

    do {
        n = recv(fd, &msg, sizeof(msg), 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    if (n == 0)
        return -EPIPE;
    return n == (ssize_t)sizeof(msg) && msg.type == type ? 0 : -EPROTO;
}

/*
 * Report a failure and exit. `grandchild` is the GrandChild's pid when the
 * Child fails after cloning it: the Parent must reap it, and this record
 * tells it the pid.
 */
static void append(char *buf, size_t *len, const char *s)
{
    while (s && *s && *len + 1 < NSX_DETAIL_MAX)
        buf[(*len)++] = *s++;
    buf[*len] = '\0';
}

/* (async-signal-safe: the init's fork reports its exec failure with it) */
_Noreturn void nsx_bail(int fd, int stage, int step, long err, const char *what,
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
    _exit(1);
}

/* Touch memory until the cgroup's limit kills us; ENOMEM if it never does. */
static long exhaust_memory(void)
{
    size_t chunk = 1 << 20;
    int i;

    for (i = 0; i < 256; i++) {
        char *p = mmap(NULL, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

        if (p == MAP_FAILED)
            return -ENOMEM;
        memset(p, 1, chunk);
    }
    return -ENOMEM;
}

/* A real SIGSEGV, also in a build with the sanitizers (which would report
 * the store and exit instead). */
__attribute__((noinline, no_sanitize("address", "undefined"))) static void crash(void)
{
    volatile uintptr_t nowhere = 0;  /* opaque to the compiler: a real fault */

    *(volatile int *)nowhere = 1;
}

/*
 * A step's result, through the test-only fault switch: at the step named in
 * plan->fault_step a step that succeeded fails with EIO, or the stage
 * crashes the way a bug or the OOM killer would end it.
 */
long nsx_checked(const struct nsx_plan *plan, int step, long rc)
{
    if (plan == NULL || rc < 0 || plan->fault_step != step)
        return rc;
    switch (plan->fault_kind) {
    case NSX_FAULT_SEGV:
        crash();
        break;
    case NSX_FAULT_ABRT:
        abort();
    case NSX_FAULT_MEMORY:
        return exhaust_memory();
    }
    return -EIO;
}

const char *nsx_plan_str(const struct nsx_plan *plan, uint32_t offset)
{
    return offset ? (const char *)plan + offset : NULL;
}

static int in_plan(const struct nsx_plan *plan, uint32_t offset, uint64_t size)
{
    return offset >= sizeof(*plan) && offset + size <= plan->size;
}

/* The record ends in a NUL, so a string offset inside it is a C string. */
static int valid_string(const struct nsx_plan *plan, uint32_t offset)
{
    return offset == 0 || in_plan(plan, offset, 1);
}

static long check_plan(const struct nsx_plan *plan, size_t n, int n_fds)
{
    const struct nsx_mount *m;
    const struct nsx_fdmap *f;
    const struct nsx_counter *c;
    int i;

    if (n < sizeof(*plan) || plan->size != n || ((const char *)plan)[n - 1] != '\0')
        return -EPROTO;
    if (plan->n_mounts < 0 || plan->n_fds < 0 || plan->n_fds > NSX_MAX_FDS ||
        plan->seccomp_len < 0 || plan->sync_target_fd < 3 ||
        plan->sync_target_fd >= NSX_MAX_FDS)
        return -EPROTO;
    if ((plan->n_mounts && !in_plan(plan, plan->mounts, sizeof(*m) * (uint64_t)plan->n_mounts)) ||
        (plan->n_fds && !in_plan(plan, plan->fds, sizeof(*f) * (uint64_t)plan->n_fds)) ||
        (plan->seccomp && !in_plan(plan, plan->seccomp, 8 * (uint64_t)plan->seccomp_len)) ||
        !valid_string(plan, plan->hostname) || !valid_string(plan, plan->cwd))
        return -EPROTO;
    if (plan->n_user_counters < 0 || plan->n_user_counters > NSX_MAX_COUNTERS ||
        plan->n_rlimits < 0 ||
        (plan->n_user_counters &&
         !in_plan(plan, plan->user_counters,
                  sizeof(*c) * (uint64_t)plan->n_user_counters)) ||
        (plan->n_rlimits &&
         !in_plan(plan, plan->rlimits, sizeof(struct nsx_rlimit) * (uint64_t)plan->n_rlimits)))
        return -EPROTO;
    if ((plan->mounts % 8) || (plan->fds % 4) || (plan->seccomp % 8) ||
        (plan->user_counters % 4) || (plan->rlimits % 8))
        return -EPROTO;
    c = (const struct nsx_counter *)((const char *)plan + plan->user_counters);
    for (i = 0; i < plan->n_user_counters; i++)
        if (!c[i].path || !valid_string(plan, c[i].path) || !c[i].value ||
            !valid_string(plan, c[i].value))
            return -EPROTO;
    m = (const struct nsx_mount *)((const char *)plan + plan->mounts);
    for (i = 0; i < plan->n_mounts; i++)
        if (!valid_string(plan, m[i].source) || !valid_string(plan, m[i].target) ||
            !valid_string(plan, m[i].fstype) || !valid_string(plan, m[i].data) || !m[i].target)
            return -EPROTO;
    f = (const struct nsx_fdmap *)((const char *)plan + plan->fds);
    for (i = 0; i < plan->n_fds; i++)
        if (f[i].src < 0 || f[i].src >= n_fds || f[i].dst < 0 || f[i].dst >= NSX_MAX_FDS)
            return -EPROTO;
    return 0;
}

/*
 * The plan arrives as one record with the fds it names (SCM_RIGHTS): the
 * GrandChild's sync socket first, then the command's fds. EOF means the
 * Parent gave up before sending it.
 */
long nsx_read_plan(struct nsx_start *start)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * (NSX_MAX_FDS + 1))];
        struct cmsghdr align;
    } control;
    struct iovec iov;
    struct msghdr msg;
    struct cmsghdr *cmsg;
    int fds[NSX_MAX_FDS + 1];
    int n_fds = 0, i;
    void *buf;
    ssize_t n;
    long rc;

    buf = malloc(NSX_PLAN_MAX);
    if (buf == NULL)
        return -ENOMEM;
    iov.iov_base = buf;
    iov.iov_len = NSX_PLAN_MAX;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    do {
        n = recvmsg(start->sync_fd, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) {
        free(buf);
        return n == 0 ? -EPIPE : -errno;
    }
    for (cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
            n_fds = (int)((cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            memcpy(fds, CMSG_DATA(cmsg), sizeof(int) * (size_t)n_fds);
        }
    }
    rc = (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || n_fds < 1
             ? -EPROTO : check_plan(buf, (size_t)n, n_fds - 1);
    if (rc < 0) {
        for (i = 0; i < n_fds; i++)
            close(fds[i]);
        free(buf);
        return rc;
    }
    start->plan = buf;
    start->grandchild_sync_fd = fds[0];
    start->n_fds = n_fds - 1;
    memcpy(start->fds, fds + 1, sizeof(int) * (size_t)start->n_fds);
    return 0;
}
