/*
 * nsinit: the helper program, one static binary the Parent execs from a
 * sealed memfd for every sandbox. It is the seed's Child (nschild.c), which
 * clones the GrandChild (nsgrandchild.c), which sets the sandbox up and
 * then is PID 1 (this file): it forks the command, forwards the signals
 * Jupyter sends to the command's process group, reaps every zombie, and
 * exits with the command's status (128+N when it died of signal N). When it
 * exits the kernel kills everything else in the pid namespace.
 *
 *   nsinit --sync-fd N -- COMMAND [ARG]...   a sandbox start (by spawn.py)
 *   nsinit -- COMMAND [ARG]...               only the init, without a sandbox
 */
#define _GNU_SOURCE
#if !defined(__x86_64__) && !defined(__aarch64__)
#error "nsinit is built and tested for x86_64 and aarch64 only; the Parent's clone trampoline (csrc/nsclone.c) must be ported first"
#endif

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nsstage.h"

static const int forwarded_signals[] = {
    SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2,
};

static _Noreturn void usage(void)
{
    fprintf(stderr, "usage: nsinit [--sync-fd N] -- COMMAND [ARG]...\n");
    exit(2);
}

/*
 * execvp without its allocations, for the moment after fork: try each
 * directory of PATH. EACCES from a directory that can't be searched, when
 * the command exists nowhere, is reported as "not found", as shells do.
 * Returns the errno to report.
 */
static int exec_search(char **argv)
{
    const char *name = argv[0], *path = getenv("PATH"), *dir, *end;
    size_t name_len = strlen(name), dir_len;
    char candidate[4096];
    struct stat st;
    int denied = 0;

    if (strchr(name, '/')) {
        execv(name, argv);
        return errno;
    }
    if (path == NULL)
        path = "/bin:/usr/bin";
    for (dir = path; ; dir = end + 1) {
        end = strchrnul(dir, ':');
        dir_len = (size_t)(end - dir);
        if (dir_len == 0) {
            dir = ".";
            dir_len = 1;
        }
        if (dir_len + name_len + 2 <= sizeof(candidate)) {
            memcpy(candidate, dir, dir_len);
            candidate[dir_len] = '/';
            memcpy(candidate + dir_len + 1, name, name_len + 1);
            execv(candidate, argv);
            if (errno == EACCES && stat(candidate, &st) == 0)
                denied = 1;
            else if (errno != ENOENT && errno != ENOTDIR && errno != EACCES)
                return errno;
        }
        if (*end == '\0')
            return denied ? EACCES : ENOENT;
    }
}

/* Exec the command with every signal unblocked; on failure report it as
 * (stage, step) on the sync socket and exit 127 (not found) or 126. */
_Noreturn void nsx_exec_command(char **argv, int sync_fd, int stage, int step)
{
    sigset_t none;
    int err;

    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    err = exec_search(argv);
    if (sync_fd >= 0)
        nsx_bail(sync_fd, stage, step, err, "exec", argv[0], 0);
    fprintf(stderr, "nsinit: exec %s: %s\n", argv[0], strerror(err));
    _exit(err == ENOENT ? 127 : 126);
}

static long block_waited(sigset_t *waited)
{
    size_t i;

    sigemptyset(waited);
    sigaddset(waited, SIGCHLD);
    for (i = 0; i < sizeof(forwarded_signals) / sizeof(forwarded_signals[0]); i++)
        sigaddset(waited, forwarded_signals[i]);
    return nsx_rc(sigprocmask(SIG_SETMASK, waited, NULL));
}

static void forward_signal(pid_t child, int sig)
{
    if (kill(-child, sig) < 0)
        kill(child, sig);
}

/* Reap every zombie; returns 1 once the command itself has been reaped. */
static int reap_zombies(pid_t child, int *status)
{
    int done = 0, st;
    pid_t pid;

    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        if (pid == child) {
            *status = st;
            done = 1;
        }
    }
    return done;
}

static int exit_code(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 1;
}

static _Noreturn void wait_and_forward_signals(const sigset_t *waited, pid_t child)
{
    siginfo_t info;
    int status = 0, sig;

    for (;;) {
        sig = sigwaitinfo(waited, &info);
        if (sig < 0) {
            if (errno == EINTR)
                continue;
            forward_signal(child, SIGKILL);
            _exit(1);
        }
        if (sig != SIGCHLD)
            forward_signal(child, sig);
        if (reap_zombies(child, &status))
            _exit(exit_code(status));
    }
}

/*
 * The command leads its own process group so that an interrupt reaches the
 * processes it started too, as with LocalProvisioner's killpg. Its copy of
 * the sync socket is close-on-exec: the Parent sees EOF once it exec'd, or
 * the error record of nsx_exec_command. Ours goes at once.
 */
_Noreturn void nsx_become_init(char **argv, int sync_fd, const struct nsx_plan *plan)
{
    sigset_t waited;
    pid_t child;
    long rc;

    prctl(PR_SET_NAME, "nsinit", 0, 0, 0);
    /* The command runs as our uid: without this it could ptrace us, stop us
     * (and with us every signal Jupyter sends) or read our memory. */
    rc = nsx_checked(plan, NSX_STEP_INIT_SETUP, nsx_rc(prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)));
    if (rc < 0)
        nsx_bail(sync_fd, NSX_STAGE_INIT, NSX_STEP_INIT_SETUP, rc, "prctl(PR_SET_DUMPABLE)",
                 NULL, 0);
    rc = nsx_checked(plan, NSX_STEP_INIT_SETUP, block_waited(&waited));
    if (rc < 0)
        nsx_bail(sync_fd, NSX_STAGE_INIT, NSX_STEP_INIT_SETUP, rc, "block signals", NULL, 0);
    child = fork();
    rc = nsx_checked(plan, NSX_STEP_INIT_FORK, child < 0 ? -errno : 1);
    if (rc < 0) {
        if (child > 0)
            kill(child, SIGKILL);
        nsx_bail(sync_fd, NSX_STAGE_INIT, NSX_STEP_INIT_FORK, rc, "fork the command", NULL, 0);
    }
    if (child == 0) {
        setpgid(0, 0);
        if (nsx_checked(plan, NSX_STEP_INIT_EXEC, 0) < 0)
            nsx_bail(sync_fd, NSX_STAGE_INIT, NSX_STEP_INIT_EXEC, -EIO, "exec", argv[0], 0);
        nsx_exec_command(argv, sync_fd, NSX_STAGE_INIT, NSX_STEP_INIT_EXEC);
    }
    setpgid(child, child);  /* whichever of us runs first */
    if (sync_fd >= 0)
        close(sync_fd);
    free((void *)plan);  /* the init's memory is per sandbox: keep it small */
    wait_and_forward_signals(&waited, child);
}

int main(int argc, char **argv)
{
    struct nsx_start start;
    int i = 1;

    memset(&start, 0, sizeof(start));
    start.sync_fd = -1;
    if (i + 1 < argc && strcmp(argv[i], "--sync-fd") == 0) {
        start.sync_fd = atoi(argv[i + 1]);
        i += 2;
    }
    if (i < argc && strcmp(argv[i], "--") == 0)
        i++;
    if (i >= argc || start.sync_fd == 0)
        usage();
    start.argv = &argv[i];
    if (start.sync_fd < 0)
        nsx_become_init(start.argv, -1, NULL);
    nsx_run_child(&start);
}
