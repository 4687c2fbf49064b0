#!/bin/sh
# Delegate a cgroup subtree to an unprivileged user, the way systemd's
# Delegate=yes does, so that a rootless run finds its own cgroups writable
# (cgroup_parent = "auto"). Run as root.
#
#   delegate_cgroups.sh USER -- CMD [ARG...]
#       run CMD as USER inside a fresh delegated subtree, then remove the
#       subtree; exits with CMD's status. CMD is exec'd directly (setpriv,
#       no su/login shell): on cgroup v2 the server must be the only process
#       in its cgroup, or it can't enable controllers for its sandboxes.
#   delegate_cgroups.sh USER PID
#       move PID (e.g. a shell) into the subtree and leave it there
#   delegate_cgroups.sh --remove USER
#       remove the subtree (it must be empty)
#
# Layout, in every v1 hierarchy with memory, pids, cpu, cpuacct or freezer,
# and in the cgroup2 mount:
#   <hierarchy root>/delegate-USER/           owned by USER
#   <cgroup2 root>/delegate-USER/session/     the process goes here on v2:
#       delegate-USER enables the controllers for its children, which the
#       no-internal-processes rule allows only while it holds no process.
set -eu

die() { echo "delegate_cgroups.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (it chowns cgroups)"
[ $# -ge 2 ] || die "usage: $0 USER -- CMD... | $0 USER PID | $0 --remove USER"

# "mount point<TAB>fstype<TAB>options" of each cgroup mount
mounts() { awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 "\t" $3 "\t" $4 }' /proc/mounts; }

# The directories of the subtree: "v1 DIR" or "v2 DIR" (v2: the process's leaf)
subtree() {
    mounts | while IFS="$(printf '\t')" read -r dir fstype options; do
        if [ "$fstype" = cgroup2 ]; then
            echo "v2 $dir/delegate-$1"
        else
            case ",$options," in
            *,memory,*|*,pids,*|*,cpu,*|*,cpuacct,*|*,freezer,*) echo "v1 $dir/delegate-$1" ;;
            esac
        fi
    done
}

remove() {
    subtree "$1" | while read -r kind dir; do
        [ -d "$dir" ] || continue
        # depth first: sandbox and group dirs the tests left would be a bug,
        # but they must not keep the subtree alive either
        find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null ||
            echo "delegate_cgroups.sh: $dir is not empty; left in place" >&2
    done
}

# chown what systemd hands over with Delegate=yes: the directory and the
# files that move processes and enable controllers, never the limits set
# from above.
hand_over() {
    user=$1 dir=$2
    chown "$user" "$dir"
    for f in cgroup.procs cgroup.threads cgroup.subtree_control tasks; do
        [ -e "$dir/$f" ] && chown "$user" "$dir/$f"
    done
    return 0
}

create() {
    user=$1
    subtree "$user" | while read -r kind dir; do
        mkdir -p "$dir"
        hand_over "$user" "$dir"
        if [ "$kind" = v2 ]; then
            root=$(dirname "$dir")
            for c in $(cat "$root/cgroup.controllers"); do
                case $c in memory|pids|cpu)
                    grep -qw "$c" "$root/cgroup.subtree_control" ||
                        echo "+$c" > "$root/cgroup.subtree_control"
                    echo "+$c" > "$dir/cgroup.subtree_control" ;;
                esac
            done
            mkdir -p "$dir/session"
            hand_over "$user" "$dir/session"
        fi
    done
}

move() {
    user=$1 pid=$2
    subtree "$user" | while read -r kind dir; do
        [ "$kind" = v2 ] && dir=$dir/session
        echo "$pid" > "$dir/cgroup.procs"
    done
}

if [ "$1" = --remove ]; then
    remove "$2"
    exit 0
fi
user=$1
id "$user" >/dev/null 2>&1 || die "no user $user"
shift
if [ "$1" != -- ]; then
    create "$user"
    move "$user" "$1"
    exit 0
fi
shift
[ $# -ge 1 ] || die "give the command after --"
create "$user"
home=$(getent passwd "$user" | cut -d: -f6)
leaves=$(subtree "$user" | while read -r kind dir; do
    [ "$kind" = v2 ] && dir=$dir/session
    echo "$dir"
done)
# The child joins the subtree, then becomes CMD as USER: nothing else of
# this script runs inside, and on v2 the command is alone in its leaf.
status=0
NSPROV_LEAVES=$leaves sh -c '
    for dir in $NSPROV_LEAVES; do echo $$ > "$dir/cgroup.procs"; done
    unset NSPROV_LEAVES
    home=$1
    shift
    exec setpriv --reuid="$0" --regid="$(id -g "$0")" --init-groups \
        env HOME="$home" USER="$0" LOGNAME="$0" "$@"
' "$user" "$home" "$@" || status=$?
remove "$user"
exit $status
