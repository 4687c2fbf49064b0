/*
 * The wire protocol and configuration shared by the Parent (Python, through
 * cffi), the clone stages (nsexec.c) and the sandbox init (nsinit.c).
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
 * the test-only fault switch (nsx_config.fault_step) makes that step fail
 * with EIO so each failure path can be exercised for real.
 */
enum nsx_step {
    NSX_STEP_NONE = 0,
    /* Parent, in Python */
    NSX_STEP_CLONE_CHILD = 1,
    NSX_STEP_WRITE_ID_MAPS = 2,
    NSX_STEP_CGROUP_ATTACH = 3,
    NSX_STEP_PIDFD_OPEN = 4,
    NSX_STEP_REAP_CHILD = 5,
    /* Child (stage 1) */
    NSX_STEP_CHILD_SETUP = 10,
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
    NSX_STEP_NETWORK = 37,
    /* the init (stage 3) */
    NSX_STEP_INIT_SETUP = 40,
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

struct nsx_mount {
    int op;
    int flags;
    const char *source;
    const char *target;
    const char *fstype;
    unsigned long mountflags;
    const char *data;
    /* NSX_MNT_BIND: the source's identity when Python checked it (st_dev,
     * st_ino); a source that is now another file fails with ESTALE. 0, 0:
     * not checked. */
    uint64_t source_dev;
    uint64_t source_ino;
};

/* A resource limit the command starts with (setrlimit: soft and hard). */
struct nsx_rlimit {
    int resource;
    uint64_t soft;
    uint64_t hard;
};

/* A write to /proc/sys/user/<name> in the sandbox's own user namespace:
 * its per-namespace share of the per-user counters (inotify, namespaces). */
struct nsx_counter {
    const char *path;    /* /proc/sys/user/<name> */
    const char *value;   /* decimal */
};

/* An address range, for the egress network's rules (nsnet.c). */
struct nsx_net_range {
    int family;                /* AF_INET or AF_INET6 */
    unsigned char addr[16];    /* network byte order; 4 bytes used for AF_INET */
    int prefix;
};

/*
 * network = "egress": what the GrandChild sets up in its new network
 * namespace while it still holds CAP_NET_ADMIN there (nsnet.c), and the
 * socket on which it hands that namespace (and its user namespace) to the
 * Parent, which attaches the user-mode network stack to them.
 */
struct nsx_net {
    const struct nsx_net_range *deny;   /* "prohibit" rules ahead of every route */
    int n_deny;
    const struct nsx_net_range *dns;    /* UDP port 53 to these stays allowed: the
                                         * stack's DNS forwarder */
    int n_dns;
    int ns_sock;                        /* SOCK_SEQPACKET; receives the two fds;
                                         * -1: no stack, loopback only */
};

struct nsx_fdmap {
    int src;
    int dst;
};

struct nsx_config {
    /* the Child's and GrandChild's ends of the sync sockets, and the
     * Parent's ends, which the stages close at once */
    int child_sync_fd;
    int grandchild_sync_fd;
    int parent_sync_fds[2];

    int unshare_flags;       /* CLONE_NEW* the Child unshares after the user ns */
    int unshare_cgroup;      /* the GrandChild unshares the cgroup ns */
    int loopback_up;         /* bring up lo in the new network namespace */
    const struct nsx_net *net;  /* egress rules and hand-over (nsnet.c), or NULL */
    int cgroup_fd;           /* a cgroup v2 directory for CLONE_INTO_CGROUP, or -1 */

    int uid;                 /* identity inside, already mapped */
    int gid;
    int drop_groups;         /* setgroups(0, NULL): setgroups is allowed */

    const char *hostname;    /* NULL: keep */
    const struct nsx_mount *mounts;
    int n_mounts;
    const char *cwd;         /* NULL: keep */

    const struct nsx_fdmap *fds;  /* fds the command gets, e.g. stdio */
    int n_fds;
    int sync_target_fd;      /* where the grandchild's sync socket ends up */
    int sync_keep_on_exec;   /* the init takes the sync socket over */

    int exec_fd;             /* a sealed memfd to execveat, or -1 */
    const char *exec_path;   /* the program, or the fallback for exec_fd */
    char *const *argv;
    char *const *envp;

    const struct nsx_counter *user_counters;
    int n_user_counters;
    const struct nsx_rlimit *rlimits;
    int n_rlimits;

    int no_new_privs;
    int drop_caps;
    const void *seccomp_filter;   /* struct sock_filter[], or NULL */
    unsigned short seccomp_len;

    int fault_step;          /* enum nsx_step to fail with EIO, test-only */

    int *grandchild_tid;     /* the kernel stores the GrandChild's pid here
                              * (seen by the Parent when memory is shared) */
    int share_memory;        /* run the stages in our memory (nsx_can_share_memory) */
};

/*
 * Clone the Child (stage 1). Returns its pid and stores a pidfd for it, or
 * returns -errno. *into_cgroup is set when clone3 placed it in cgroup_fd.
 * *stack is the stages' stack in our memory (or NULL): release it with
 * nsx_free_stack() (or pass it in *stack to a later call, to be reused) only
 * once both stages are reaped or exec'd, and keep cfg and everything it
 * points to alive as long. On failure *stack is freed and set to NULL.
 * Only the calling thread returns; the Child never does.
 */
int nsx_clone_child(const struct nsx_config *cfg, int *pidfd, int *into_cgroup, void **stack);
void nsx_free_stack(void *stack);

/* Whether this build can run the stages in the server's memory (x86_64 and
 * aarch64), and the server's dumpable flag (prctl PR_GET_DUMPABLE). */
int nsx_can_share_memory(void);
int nsx_dumpable(void);

/* cdef-end */

#endif
