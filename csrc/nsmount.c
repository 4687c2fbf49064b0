/*
 * The mount operations the GrandChild runs, on paths Python planned before
 * the start. The table itself, and why each entry is in its place, is
 * nsprovisioner/mounts.py. The newer mount API (open_tree, move_mount,
 * mount_setattr) is called through syscall(2): glibc 2.36's wrappers clash
 * with <linux/mount.h>.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/mount.h>
#include <linux/openat2.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "nsmount.h"
#include "nsstage.h"

/* Read-only (or other attributes) on one mount or a whole subtree. */
static long set_mount_attr(const char *target, const struct nsx_mount *m)
{
    struct mount_attr attr;

    memset(&attr, 0, sizeof(attr));
    attr.attr_set = m->mountflags;
    return nsx_rc(syscall(SYS_mount_setattr, AT_FDCWD, target,
                          AT_NO_AUTOMOUNT | ((m->flags & NSX_MNT_RECURSIVE) ? AT_RECURSIVE : 0),
                          &attr, sizeof(attr)));
}

/*
 * Two uses. With put_old, the staging step: the host's root moves to put_old
 * under the new root, where the binds of the table find their sources.
 * Without it, the final step: pivot_root(".", ".") stacks the old root on top
 * of the new one, and detaching it leaves only the new root, with nothing of
 * the host (nor of the staging area) reachable through it.
 */
static long pivot_into(const char *root, const char *put_old)
{
    if (chdir(root) < 0)
        return -errno;
    if (syscall(SYS_pivot_root, ".", put_old ? put_old : ".") < 0)
        return -errno;
    if (!put_old && umount2(".", MNT_DETACH) < 0)
        return -errno;
    return nsx_rc(chdir("/"));
}

static long open_path_nofollow(const char *path)
{
    struct open_how how;

    memset(&how, 0, sizeof(how));
    how.flags = O_PATH | O_CLOEXEC;
    how.resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    return nsx_rc(syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof(how)));
}

/*
 * Python stat'ed the source when it planned the bind; a path that names
 * another file now (a component renamed and recreated since) must not be
 * bound in its place.
 */
static long check_identity(int fd, const struct nsx_mount *m)
{
    struct stat st;

    if (fstat(fd, &st) < 0)
        return -errno;
    return (uint64_t)st.st_dev == m->source_dev && (uint64_t)st.st_ino == m->source_ino
           ? 0 : -ESTALE;
}

/*
 * The binds of configured paths. Python resolved them to real paths, but a
 * process in another sandbox that can write a parent directory could swap
 * in a symlink since then: both ends are opened refusing symlinks (ELOOP
 * fails the start, it never redirects a mask), and the attributes are set on
 * the detached copy, so a read-only path is never writable, not even for a
 * moment.
 */
static long bind_nofollow(const char *source, const char *target, const struct nsx_mount *m)
{
    struct mount_attr attr;
    long src, dst = -1, tree = -1, rc;

    rc = src = open_path_nofollow(source);
    if (src >= 0 && m->source_ino)
        rc = check_identity((int)src, m);
    if (rc >= 0)
        rc = dst = open_path_nofollow(target);
    if (dst >= 0)
        rc = tree = nsx_rc(syscall(SYS_open_tree, src, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC |
                                   AT_EMPTY_PATH | AT_RECURSIVE));
    if (tree >= 0) {
        memset(&attr, 0, sizeof(attr));
        attr.attr_set = m->mountflags;
        rc = m->mountflags == 0 ? 0
             : nsx_rc(syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr,
                              sizeof(attr)));
        if (rc == 0)
            rc = nsx_rc(syscall(SYS_move_mount, tree, "", dst, "",
                                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH));
    }
    if (tree >= 0)
        close((int)tree);
    if (dst >= 0)
        close((int)dst);
    if (src >= 0)
        close((int)src);
    return rc;
}

static long make_dir(const char *target, const struct nsx_mount *m)
{
    if (mkdir(target, m->mountflags ? (mode_t)m->mountflags : 0755) < 0)
        return errno == EEXIST ? 0 : -errno;
    /* the mode is exact (a hidden directory's 0111 must not become 0101) */
    return m->mountflags ? nsx_rc(chmod(target, (mode_t)m->mountflags)) : 0;
}

long nsx_run_mount_op(const struct nsx_plan *plan, const struct nsx_mount *m)
{
    const char *source = nsx_plan_str(plan, m->source);
    const char *target = nsx_plan_str(plan, m->target);
    int fd;

    switch (m->op) {
    case NSX_MNT_MOUNT:
        return nsx_rc(mount(source, target, nsx_plan_str(plan, m->fstype), m->mountflags,
                            nsx_plan_str(plan, m->data)));
    case NSX_MNT_SETATTR:
        return set_mount_attr(target, m);
    case NSX_MNT_MKDIR:
        return make_dir(target, m);
    case NSX_MNT_TOUCH:
        fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
        return fd < 0 ? -errno : nsx_rc(close(fd));
    case NSX_MNT_SYMLINK:
        if (symlink(source, target) < 0)
            return errno == EEXIST ? 0 : -errno;
        return 0;
    case NSX_MNT_PIVOT:
        return pivot_into(target, source);
    case NSX_MNT_CHMOD:
        return nsx_rc(chmod(target, (mode_t)m->mountflags));
    case NSX_MNT_BIND:
        return bind_nofollow(source, target, m);
    }
    return -EINVAL;
}

const char *nsx_mount_op_name(int op)
{
    switch (op) {
    case NSX_MNT_MOUNT: return "mount";
    case NSX_MNT_SETATTR: return "set mount attributes on";
    case NSX_MNT_MKDIR: return "mkdir";
    case NSX_MNT_TOUCH: return "create mount point";
    case NSX_MNT_SYMLINK: return "symlink";
    case NSX_MNT_PIVOT: return "pivot_root into";
    case NSX_MNT_CHMOD: return "chmod";
    case NSX_MNT_BIND: return "bind";
    }
    return "unknown mount op on";
}
