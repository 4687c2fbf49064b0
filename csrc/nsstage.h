/*
 * Inside the helper (nsinit): what its files share. The helper is its own
 * process from the first instruction (the server exec'd it), so this is
 * ordinary C with libc; every call is checked, and every failure goes to the
 * Parent as one struct nsx_msg before the stage exits.
 */
#ifndef NSPROV_NSSTAGE_H
#define NSPROV_NSSTAGE_H

#include "nsexec.h"

/* One sandbox start, as the Child received it. */
struct nsx_start {
    const struct nsx_plan *plan;
    int sync_fd;                  /* this stage's end of its sync socket */
    int grandchild_sync_fd;       /* received with the plan */
    int fds[NSX_MAX_FDS];         /* the sources of plan->fds, received with it */
    int n_fds;
    char **argv;                  /* the command */
};

/* nssync.c: the conversation with the Parent. Functions return 0 or -errno. */
long nsx_send_sync(int fd, int type, int pid0, int pid1);
long nsx_wait_sync(int fd, int type);
_Noreturn void nsx_bail(int fd, int stage, int step, long err, const char *what,
                        const char *path, long grandchild);
long nsx_checked(const struct nsx_plan *plan, int step, long rc);
long nsx_read_plan(struct nsx_start *start);
const char *nsx_plan_str(const struct nsx_plan *plan, uint32_t offset);
long nsx_rc(long rc);  /* a libc result as 0.. or -errno */

/* nschild.c, nsgrandchild.c, nsinit.c: the stages, in the order they run */
_Noreturn void nsx_run_child(struct nsx_start *start);
_Noreturn void nsx_run_grandchild(struct nsx_start *start);
_Noreturn void nsx_exec_command(char **argv, int sync_fd, int stage, int step);
_Noreturn void nsx_become_init(char **argv, int sync_fd, const struct nsx_plan *plan);

#endif
