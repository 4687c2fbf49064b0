/*
 * nsinit: PID 1 of a sandbox.
 *
 *   nsinit [--sync-fd N] -- COMMAND [ARG]...
 *
 * Forks COMMAND in its own process group, forwards the signals Jupyter sends
 * to that group, reaps every zombie, and exits with COMMAND's status (128+N
 * when it died of signal N). When it exits the kernel kills everything else
 * in the pid namespace, so nothing of the sandbox outlives the command.
 *
 * With --sync-fd, N is the GrandChild's sync socket: an exec failure of
 * COMMAND travels to the Parent as an error record, and the Parent sees EOF
 * once COMMAND has been exec'd.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nsexec.h"

static const int forwarded_signals[] = {
    SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2,
};

struct init_args {
    int sync_fd;
    char **command;
};

static _Noreturn void usage(void)
{
    fprintf(stderr, "usage: nsinit [--sync-fd N] -- COMMAND [ARG]...\n");
    exit(2);
}

static struct init_args parse_args(int argc, char **argv)
{
    struct init_args args = {-1, NULL};
    int i = 1;

    if (i + 1 < argc && strcmp(argv[i], "--sync-fd") == 0) {
        args.sync_fd = atoi(argv[i + 1]);
        i += 2;
    }
    if (i < argc && strcmp(argv[i], "--") == 0)
        i++;
    if (i >= argc)
        usage();
    args.command = &argv[i];
    return args;
}

static void configure_signals(sigset_t *waited, sigset_t *original)
{
    size_t i;

    sigemptyset(waited);
    sigaddset(waited, SIGCHLD);
    for (i = 0; i < sizeof(forwarded_signals) / sizeof(forwarded_signals[0]); i++)
        sigaddset(waited, forwarded_signals[i]);
    if (sigprocmask(SIG_BLOCK, waited, original) < 0) {
        fprintf(stderr, "nsinit: sigprocmask: %s\n", strerror(errno));
        exit(1);
    }
}

static void report_exec_failure(int sync_fd, const char *command, int err)
{
    struct nsx_msg msg;

    memset(&msg, 0, sizeof(msg));
    msg.type = NSX_SYNC_ERROR;
    msg.stage = NSX_STAGE_INIT;
    msg.step = NSX_STEP_INIT_EXEC;
    msg.err = err;
    snprintf(msg.detail, sizeof(msg.detail), "exec %s", command);
    send(sync_fd, &msg, sizeof(msg), MSG_NOSIGNAL);
}

/*
 * execvp reports EACCES when some directory on PATH can't be searched, even
 * if the command exists nowhere; report that as "not found", as shells do.
 */
static int exec_errno(const char *command, int err)
{
    const char *path = getenv("PATH");
    char candidate[4096];
    const char *dir, *end;
    struct stat st;

    if (err != EACCES || strchr(command, '/') || !path)
        return err;
    for (dir = path; ; dir = end + 1) {
        end = strchr(dir, ':');
        if (!end)
            end = dir + strlen(dir);
        snprintf(candidate, sizeof(candidate), "%.*s/%s", (int)(end - dir),
                 end == dir ? "." : dir, command);
        if (stat(candidate, &st) == 0)
            return err;  /* it exists: permission really is the problem */
        if (!*end)
            return ENOENT;
    }
}

/* The command leads its own process group so that an interrupt reaches the
 * processes it started too, as with LocalProvisioner's killpg. */
static pid_t spawn(const struct init_args *args, const sigset_t *original)
{
    pid_t pid = fork();
    int err;

    if (pid < 0) {
        fprintf(stderr, "nsinit: fork: %s\n", strerror(errno));
        exit(1);
    }
    if (pid == 0) {
        sigprocmask(SIG_SETMASK, original, NULL);
        setpgid(0, 0);
        if (args->sync_fd >= 0)
            fcntl(args->sync_fd, F_SETFD, FD_CLOEXEC);
        execvp(args->command[0], args->command);
        err = exec_errno(args->command[0], errno);
        if (args->sync_fd >= 0)
            report_exec_failure(args->sync_fd, args->command[0], err);
        else
            fprintf(stderr, "nsinit: exec %s: %s\n", args->command[0], strerror(err));
        _exit(err == ENOENT ? 127 : 126);
    }
    setpgid(pid, pid);  /* whichever of us runs first */
    if (args->sync_fd >= 0)
        close(args->sync_fd);
    return pid;
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

int main(int argc, char **argv)
{
    struct init_args args = parse_args(argc, argv);
    sigset_t waited, original;
    siginfo_t info;
    pid_t child;
    int status = 0, sig;

    prctl(PR_SET_NAME, "nsinit", 0, 0, 0);
    /* The kernel runs as our uid: without this it could ptrace us, stop us
     * (and with us every signal Jupyter sends) or read our memory. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) {
        fprintf(stderr, "nsinit: prctl(PR_SET_DUMPABLE): %s\n", strerror(errno));
        return 1;
    }
    configure_signals(&waited, &original);
    /* A server's pid means nothing in here; the command's parent is PID 1,
     * for which ipykernel skips its parent poller. */
    if (getenv("JPY_PARENT_PID"))
        setenv("JPY_PARENT_PID", "1", 1);
    child = spawn(&args, &original);

    for (;;) {
        sig = sigwaitinfo(&waited, &info);
        if (sig < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "nsinit: sigwaitinfo: %s\n", strerror(errno));
            forward_signal(child, SIGKILL);
            return 1;
        }
        if (sig != SIGCHLD)
            forward_signal(child, sig);
        if (reap_zombies(child, &status))
            return exit_code(status);
    }
}
