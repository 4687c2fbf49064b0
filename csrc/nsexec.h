/*
 * The wire protocol between the Parent (the Jupyter server: Python, through
 * cffi) and the helper program nsinit (the seed's Child and GrandChild, and
 * then the sandbox's PID 1): the sync records, the step numbers, and the
 * plan the Child reads from its socket.
 *
 * This file is read twice: by the C compiler, and by cffi's cdef, which gets
 * only the text between the two "cdef" markers. That region therefore holds
 * plain declarations and integer #defines, nothing else, so the numbers below
 * exist exactly once.
 */
#ifndef NSPROV_NSEXEC_H
#define NSPROV_NSEXEC_H

#include <stdint.h>

/* cdef-begin */

/* The conversation of the seed's sequence diagram, one value per arrow. */
enum nsx_sync {
    NSX_SYNC_USERMAP_PLS = 0x40,
    NSX_SYNC_USERMAP_ACK = 0x41,
    NSX_SYNC_RECVPID_PLS = 0x42,
    NSX_SYNC_RECVPID_ACK = 0x43,
    NSX_SYNC_GRANDCHILD = 0x44,
    NSX_SYNC_CHILD_READY = 0x45,
    NSX_SYNC_ERROR = 0x4f
};

/* Who sent an error record. */
enum nsx_stage {
    NSX_STAGE_PARENT = 0,
    NSX_STAGE_CHILD = 1,
    NSX_STAGE_GRANDCHILD = 2,
    NSX_STAGE_INIT = 3
};

/*
 * Every step that can fail, in the order it runs. Error records name one, and
 * the test-only fault switch (nsx_plan.fault_step, fault_kind) makes that
 * step fail, or crash, so each failure path can be exercised for real.
 */
enum nsx_step {
    NSX_STEP_NONE = 0,
    /* Parent, in Python */
    NSX_STEP_CLONE_CHILD = 1,      /* start the helper: clone and exec */
    NSX_STEP_WRITE_ID_MAPS = 2,
    NSX_STEP_CGROUP_ATTACH = 3,
    NSX_STEP_PIDFD_OPEN = 4,
    NSX_STEP_REAP_CHILD = 5,
    /* Child (stage 1) */
    NSX_STEP_CHILD_SETUP = 10,     /* fds, parent-death signal, dumpable flag */
    NSX_STEP_READ_PLAN = 19,
    NSX_STEP_UNSHARE_USER = 11,
    NSX_STEP_SEND_USERMAP_PLS = 12,
    NSX_STEP_WAIT_USERMAP_ACK = 13,
    NSX_STEP_UNSHARE_NAMESPACES = 14,
    NSX_STEP_CLONE_GRANDCHILD = 15,
    NSX_STEP_SEND_RECVPID_PLS = 16,
    NSX_STEP_WAIT_RECVPID_ACK = 17,
    NSX_STEP_SEND_CHILD_READY = 18,
    /* GrandChild (stage 2) */
    NSX_STEP_WAIT_GRANDCHILD = 20,
    NSX_STEP_SETSID = 21,
    NSX_STEP_SET_IDS = 22,
    NSX_STEP_UNSHARE_CGROUP = 23,
    NSX_STEP_LOOPBACK = 34,
    NSX_STEP_MOUNT = 24,
    NSX_STEP_HOSTNAME = 25,
    NSX_STEP_CHDIR = 26,
    NSX_STEP_PDEATHSIG = 27,
    NSX_STEP_FDS = 28,
    NSX_STEP_NO_NEW_PRIVS = 29,
    NSX_STEP_DROP_CAPS = 30,
    NSX_STEP_SECCOMP = 31,
    NSX_STEP_SEND_GRANDCHILD_READY = 32,
    NSX_STEP_EXEC = 33,
    NSX_STEP_USER_COUNTERS = 35,
    NSX_STEP_RLIMITS = 36,
    /* the init (stage 3) */
    NSX_STEP_INIT_SETUP = 40,      /* name, signals */
    NSX_STEP_INIT_FORK = 41,
    NSX_STEP_INIT_EXEC = 42
};

#define NSX_DETAIL_MAX 240

/* One datagram on a sync socket (SOCK_SEQPACKET keeps it whole). */
struct nsx_msg {
    int32_t type;    /* enum nsx_sync */
    int32_t stage;   /* enum nsx_stage, for NSX_SYNC_ERROR */
    int32_t step;    /* enum nsx_step, for NSX_SYNC_ERROR */
    int32_t err;     /* errno, for NSX_SYNC_ERROR */
    int32_t pid[2];  /* child, grandchild: for NSX_SYNC_RECVPID_PLS */
    char detail[240];
};

/* What the fault switch does at nsx_plan.fault_step (tests only). */
enum nsx_fault {
    NSX_FAULT_EIO = 0,      /* the step fails with EIO and reports it */
    NSX_FAULT_SEGV = 1,     /* the stage dereferences NULL */
    NSX_FAULT_ABRT = 2,     /* the stage calls abort() */
    NSX_FAULT_MEMORY = 3    /* the stage touches memory until its cgroup's
                             * limit kills it */
};

/* Operations of the grandchild's mount table, planned by Python (mounts.py). */
enum nsx_mount_op {
    NSX_MNT_MOUNT = 1,      /* mount(source, target, fstype, mountflags, data) */
    NSX_MNT_SETATTR = 2,    /* mount_setattr(target, attr_set = mountflags) */
    NSX_MNT_MKDIR = 3,      /* mkdir(target, mode = mountflags or 0755); an existing one
                             * is fine */
    NSX_MNT_TOUCH = 4,      /* create an empty file target (bind-mount point) */
    NSX_MNT_SYMLINK = 5,    /* symlink(source, target) */
    NSX_MNT_PIVOT = 6,      /* pivot_root into target; source NULL: detach the old
                             * root; else keep it at source (relative to target) */
    NSX_MNT_CHMOD = 7,      /* chmod(target, mountflags) */
    NSX_MNT_BIND = 8        /* recursive bind of source on target, following no
                             * symlink, with the MOUNT_ATTR_* in mountflags set
                             * before it is attached */
};

/* nsx_mount.flags */
#define NSX_MNT_OPTIONAL 1   /* ENOENT on the target is not an error */
#define NSX_MNT_RECURSIVE 2  /* NSX_MNT_SETATTR applies to every submount */
#define NSX_MNT_REACHABLE 4  /* EACCES is not an error: a path the sandbox can't
                              * reach needs no protection */

/*
 * The plan: one struct nsx_plan, then the data its offsets point into, sent
 * as one record on the Child's sync socket together with the fds it needs
 * (SCM_RIGHTS): first the GrandChild's sync socket, then the sources of
 * nsx_plan.fds. An offset of 0 means "none"; every string is NUL-terminated
 * inside the record. The command's argv and environment are the helper's own
 * (the Parent execs it with them), so they are not repeated here.
 */
#define NSX_PLAN_MAX 131072
#define NSX_MAX_FDS 64
#define NSX_MAX_COUNTERS 16

struct nsx_mount {
    int32_t op;              /* enum nsx_mount_op */
    int32_t flags;
    uint32_t source;         /* offsets of strings */
    uint32_t target;
    uint32_t fstype;
    uint32_t data;
    uint64_t mountflags;
    /* NSX_MNT_BIND: the source's identity when Python checked it (st_dev,
     * st_ino); a source that is now another file fails with ESTALE. 0, 0:
     * not checked. */
    uint64_t source_dev;
    uint64_t source_ino;
};

/* A resource limit the command starts with (setrlimit: soft and hard). */
struct nsx_rlimit {
    int32_t resource;
    int32_t pad;
    uint64_t soft;
    uint64_t hard;
};

/* A write to /proc/sys/user/<name> in the sandbox's own user namespace:
 * its per-namespace share of the per-user counters (inotify, namespaces). */
struct nsx_counter {
    uint32_t path;           /* offset of "/proc/sys/user/<name>" */
    uint32_t value;          /* offset of the decimal value */
};

struct nsx_fdmap {
    int32_t src;             /* index among the fds passed with the plan */
    int32_t dst;             /* the fd number the command gets */
};

struct nsx_plan {
    uint32_t size;           /* of the whole record */
    int32_t parent_pid;      /* the server, to notice its death before PDEATHSIG */

    int32_t unshare_flags;   /* CLONE_NEW* the Child unshares after the user ns */
    int32_t unshare_cgroup;  /* the GrandChild unshares the cgroup ns */
    int32_t loopback_up;     /* bring up lo in the new network namespace */

    int32_t uid;             /* identity inside, already mapped */
    int32_t gid;
    int32_t drop_groups;     /* setgroups(0, NULL): setgroups is allowed */

    uint32_t hostname;       /* 0: keep */
    uint32_t cwd;            /* 0: keep */
    uint32_t mounts;         /* struct nsx_mount[n_mounts] */
    int32_t n_mounts;
    uint32_t fds;            /* struct nsx_fdmap[n_fds] */
    int32_t n_fds;
    int32_t sync_target_fd;  /* where the GrandChild's sync socket ends up */

    int32_t init;            /* 1: the GrandChild becomes the init and forks the
                              * command; 0: it execs the command as PID 1 */
    uint32_t seccomp;        /* struct sock_filter[seccomp_len], or 0 */
    int32_t seccomp_len;

    uint32_t user_counters;  /* struct nsx_counter[n_user_counters] */
    int32_t n_user_counters;
    uint32_t rlimits;        /* struct nsx_rlimit[n_rlimits] */
    int32_t n_rlimits;

    int32_t fault_step;      /* enum nsx_step, tests only */
    int32_t fault_kind;      /* enum nsx_fault */
};

/*
 * Start the helper (the Child) from the server: clone3 with CLONE_VM |
 * CLONE_VFORK | CLONE_PIDFD (| CLONE_INTO_CGROUP when cgroup_fd >= 0), and in
 * the clone only: clear close-on-exec on sync_fd and execveat(exec_fd), or
 * execve(path) when exec_fd is -1 or its exec is refused. Returns the pid and
 * stores a pidfd, or returns -errno: of the clone, or of the exec (then
 * *exec_failed is 1, *memfd_errno holds the errno of the memfd's exec).
 */
int nsx_start_helper(int exec_fd, const char *path, char *const argv[], char *const envp[],
                     int sync_fd, int cgroup_fd, int *pidfd, int *exec_failed,
                     int *memfd_errno);

/* cdef-end */

#endif
