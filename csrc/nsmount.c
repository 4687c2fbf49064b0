/*
 * The mount operations the GrandChild runs, between clone and exec: raw
 * syscalls on paths Python planned before the clone, nothing else (see
 * nsxsys.h for why they bypass libc). The table itself, and why each entry is in
 * its place, is nsprovisioner/mounts.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/mount.h>
#include <linux/openat2.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "nsmount.h"
#include "nsxsys.h"

/* Read-only (or other attributes) on one mount or a whole subtree. */
static long set_mount_attr(const struct nsx_mount *m)
{
    struct mount_attr attr;
    struct statfs st;
    unsigned long keep;
    long rc;

    memset(&attr, 0, sizeof(attr));
    attr.attr_set = m->mountflags;
    rc = NSX_SYS5(SYS_mount_setattr, AT_FDCWD, m->target,
                  AT_NO_AUTOMOUNT | ((m->flags & NSX_MNT_RECURSIVE) ? AT_RECURSIVE : 0),
                  &attr, sizeof(attr));
    if (rc != -ENOSYS || (m->flags & NSX_MNT_RECURSIVE) || m->mountflags != MOUNT_ATTR_RDONLY)
        return rc;
    /* Before Linux 5.12: a remount must repeat the flags the kernel locked. */
    if ((rc = NSX_SYS2(SYS_statfs, m->target, &st)) < 0)
        return rc;
    keep = (unsigned long)st.f_flags &
           (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME | MS_RELATIME);
    return NSX_SYS5(SYS_mount, NULL, m->target, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | keep,
                    NULL);
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
    long rc;

    if ((rc = NSX_SYS1(SYS_chdir, root)) < 0)
        return rc;
    if ((rc = NSX_SYS2(SYS_pivot_root, ".", put_old ? put_old : ".")) < 0)
        return rc;
    if (!put_old && (rc = NSX_SYS2(SYS_umount2, ".", MNT_DETACH)) < 0)
        return rc;
    return NSX_SYS1(SYS_chdir, "/");
}

static long open_path_nofollow(const char *path)
{
    struct open_how how;

    memset(&how, 0, sizeof(how));
    how.flags = O_PATH | O_CLOEXEC;
    how.resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    return NSX_SYS4(SYS_openat2, AT_FDCWD, path, &how, sizeof(how));
}

/*
 * Python stat'ed the source when it planned the bind; a path that names
 * another file now (a component renamed and recreated since) must not be
 * bound in its place.
 */
static long check_identity(long fd, const struct nsx_mount *m)
{
    struct stat st;
    long rc = NSX_SYS2(SYS_fstat, fd, &st);

    if (rc < 0)
        return rc;
    return (uint64_t)st.st_dev == m->source_dev && (uint64_t)st.st_ino == m->source_ino
           ? 0 : -ESTALE;
}

/*
 * The binds of configured paths. Python resolved them to real paths, but a
 * process in another sandbox that can write a parent directory could swap
 * in a symlink since then: both ends are opened refusing symlinks (ELOOP
 * fails the start, it never redirects a mask), and the attributes are set on
 * the detached copy, so a read-only path is never writable, not even for a
 * moment. Before Linux 5.12 (ENOSYS): a plain bind, then the attributes.
 */
static long bind_nofollow(const struct nsx_mount *m)
{
    struct mount_attr attr;
    struct nsx_mount setattr_op;
    long src, dst = -1, tree = -1, rc;

    rc = src = open_path_nofollow(m->source);
    if (src >= 0 && m->source_ino)
        rc = check_identity(src, m);
    if (rc >= 0)
        rc = dst = open_path_nofollow(m->target);
    if (dst >= 0)
        rc = tree = NSX_SYS3(SYS_open_tree, src, "",
                             OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | AT_RECURSIVE);
    if (tree >= 0) {
        memset(&attr, 0, sizeof(attr));
        attr.attr_set = m->mountflags;
        rc = m->mountflags == 0 ? 0
             : NSX_SYS5(SYS_mount_setattr, tree, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr,
                        sizeof(attr));
        if (rc == 0)
            rc = NSX_SYS5(SYS_move_mount, tree, "", dst, "",
                          MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH);
    }
    if (tree >= 0)
        NSX_SYS1(SYS_close, tree);
    if (dst >= 0)
        NSX_SYS1(SYS_close, dst);
    if (src >= 0)
        NSX_SYS1(SYS_close, src);
    if (rc != -ENOSYS)
        return rc;
    if ((rc = NSX_SYS5(SYS_mount, m->source, m->target, NULL, MS_BIND | MS_REC, NULL)) < 0)
        return rc;
    if (m->mountflags == 0)
        return 0;
    setattr_op = *m;
    setattr_op.flags |= NSX_MNT_RECURSIVE;
    return set_mount_attr(&setattr_op);
}

static long make_dir(const struct nsx_mount *m)
{
    long rc = NSX_SYS3(SYS_mkdirat, AT_FDCWD, m->target,
                       m->mountflags ? (mode_t)m->mountflags : 0755);

    if (rc < 0)
        return rc == -EEXIST ? 0 : rc;
    /* the mode is exact (a hidden directory's 0111 must not become 0101) */
    return m->mountflags ? NSX_SYS3(SYS_fchmodat, AT_FDCWD, m->target, m->mountflags) : 0;
}

long nsx_run_mount_op(const struct nsx_mount *m)
{
    long rc;

    switch (m->op) {
    case NSX_MNT_MOUNT:
        return NSX_SYS5(SYS_mount, m->source, m->target, m->fstype, m->mountflags, m->data);
    case NSX_MNT_SETATTR:
        return set_mount_attr(m);
    case NSX_MNT_MKDIR:
        return make_dir(m);
    case NSX_MNT_TOUCH:
        rc = NSX_SYS4(SYS_openat, AT_FDCWD, m->target,
                      O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
        return rc < 0 ? rc : NSX_SYS1(SYS_close, rc);
    case NSX_MNT_SYMLINK:
        rc = NSX_SYS3(SYS_symlinkat, m->source, AT_FDCWD, m->target);
        return rc == -EEXIST ? 0 : rc;
    case NSX_MNT_PIVOT:
        return pivot_into(m->target, m->source);
    case NSX_MNT_CHMOD:
        return NSX_SYS3(SYS_fchmodat, AT_FDCWD, m->target, m->mountflags);
    case NSX_MNT_BIND:
        return bind_nofollow(m);
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
