#!/usr/bin/env bash
# Runs inside the pure cgroup-v2 VM that scripts/vm-test.sh boots, as root:
# the tests that depend on the cgroup version and on delegation, three times.
#   1. as root, the server alone in a service's cgroup (as systemd runs one);
#   2. as a throw-away user owning a subtree delegated the way systemd's
#      Delegate=yes makes one (tests/delegate_cgroups.sh), cgroup_parent "auto";
#   3. as that user in a cgroup root owns (a login session without
#      delegation): limits fail with the documented fix, a start without
#      limits works.
#   vm-guest.sh VENV WORK    WORK: the test copy (tests/ and the rest)
# The VM is thrown away afterwards: the user, its home and the overlays of
# /etc and /tmp that it writes go with it.
set -euo pipefail
VENV=$1 WORK=$2
CG=/sys/fs/cgroup
# qemu without KVM runs a kernel start several times slower (tests/conftest.py)
export NSPROV_TEST_SLOWDOWN=4
PYTEST=(-m pytest -q -p no:cacheprovider --tb=short --durations=8)

echo "== vm: $(uname -r), cgroup2 controllers: $(cat $CG/cgroup.controllers)"
[ "$(stat -f -c %T $CG)" = cgroup2fs ] || { echo "vm: $CG is not cgroup2" >&2; exit 1; }
[ ! -e /sys/fs/cgroup/unified ] || { echo "vm: not a pure cgroup-v2 host" >&2; exit 1; }

# What depends on the cgroup version or on delegation (README.md, "Run the
# whole test suite"); not what only reads files (the fake cgroupfs tests), nor
# the slowest of what else covers (under TCG a CLI run takes 5-10 s).
CGROUP_TESTS=()
for t in memory_bomb_is_oom_killed_and_counted usage_reports_memory_pids_and_cpu \
        fork_bomb_stops_at_pids_limit_and_sandbox_stays_usable cpu_limit_half_a_core \
        cgroup_namespace_root_is_the_sandbox_cgroup limit_files_hold_the_configured_values \
        limits_cant_be_raised_from_inside no_cgroup_left_after_normal_exit \
        kill_and_remove_kills_everything_inside \
        no_cgroup_left_when_the_server_exits_with_sandboxes_running \
        same_name_twice_gets_two_cgroups no_cgroup_left_after_failed_launch \
        v2_clone_into_cgroup_places_the_sandbox v2_without_clone_into_cgroup_attach_moves_the_child \
        sweep_kills_and_removes_groups_of_dead_servers cli_memory_limit_kills_a_memory_bomb \
        no_limits_never_block_a_start sandboxes_follow_the_server_into_another_cgroup; do
    CGROUP_TESTS+=("tests/test_cgroups.py::test_$t")
done
CGROUP_TESTS+=(
    tests/test_kernel_limits.py
    tests/test_cgroup_view.py
    tests/test_install_check.py::test_strict_install_refuses_a_limit_this_user_cant_have
    tests/test_hostile_crash.py::test_next_run_removes_a_killed_runs_cgroups
    "tests/test_provisioner.py::test_provisioner_info_round_trip[namespace]"
    tests/test_doctor.py::test_doctor_on_this_host
)
UNDELEGATED_TESTS=(
    tests/test_cgroups.py::test_undelegated_user_gets_the_fix_and_starts_without_limits
    tests/test_install_check.py::test_strict_install_refuses_a_limit_this_user_cant_have
    tests/test_doctor.py::test_doctor_on_this_host
)

# A throw-away user, written into the VM's own /etc (an overlay the host
# never sees); useradd can't replace /etc/shadow, which virtme mounts over.
user=nsprovvm uid=64999
echo "$user:x:$uid:$uid::/home/$user:/bin/bash" >> /etc/passwd
echo "$user:x:$uid:" >> /etc/group
echo "$user:300000:65536" >> /etc/subuid
echo "$user:300000:65536" >> /etc/subgid
mkdir -p "/home/$user"
chown "$user:$user" "/home/$user"

status=0
# A pass's cgroup, depth first. What the tests leave is their failure
# (no_cgroup_left); what stays here is the empty leaf each server moved into
# (cgroups.py), which the next server's sweep would remove.
remove() {
    find "$1" -depth -type d -exec rmdir {} + 2>/dev/null ||
        { echo "vm: $1 is not empty: $(find "$1" -type d)" >&2; status=1; }
}
pass() {  # name seconds-since-start
    echo "== vm: $1 passed in $(( SECONDS - $2 )) s"
}

echo "== vm: tests as root, the server alone in $CG/nsprov-vm.service"
# systemd enables the controllers at the root for its slices and services
for c in memory pids cpu; do echo "+$c" > $CG/cgroup.subtree_control; done
mkdir $CG/nsprov-vm.service
t=$SECONDS
(cd "$WORK" && NSPROV_REQUIRE_CGROUPS=1 sh -c \
    'echo $$ > '"$CG"'/nsprov-vm.service/cgroup.procs && exec "$0" "$@"' \
    "$VENV/bin/python" "${PYTEST[@]}" "${CGROUP_TESTS[@]}") && pass root $t || status=1
remove $CG/nsprov-vm.service

echo "== vm: tests as $user in a delegated subtree (cgroup_parent = \"auto\")"
chown -R "$user" "$WORK"
t=$SECONDS
bash "$WORK/tests/delegate_cgroups.sh" "$user" -- \
    env -i HOME="/home/$user" USER="$user" LOGNAME="$user" LANG=C.UTF-8 \
    PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" NSPROV_REQUIRE_CGROUPS=1 \
    NSPROV_TEST_SLOWDOWN=$NSPROV_TEST_SLOWDOWN \
    bash -c "cd '$WORK' && exec python $(printf '%q ' "${PYTEST[@]}" "${CGROUP_TESTS[@]}")" && pass delegated $t ||
    status=1

echo "== vm: tests as $user without delegation (a root-owned session cgroup)"
mkdir $CG/nsprov-vm-session.scope
t=$SECONDS
(cd "$WORK" && NSPROV_EXPECT_UNDELEGATED=1 sh -c \
    'echo $$ > '"$CG"'/nsprov-vm-session.scope/cgroup.procs && exec "$@"' sh \
    setpriv --reuid="$uid" --regid="$uid" --init-groups \
    env -i HOME="/home/$user" USER="$user" LOGNAME="$user" LANG=C.UTF-8 \
    PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" NSPROV_EXPECT_UNDELEGATED=1 \
    NSPROV_TEST_SLOWDOWN=$NSPROV_TEST_SLOWDOWN \
    python "${PYTEST[@]}" "${UNDELEGATED_TESTS[@]}") && pass undelegated $t || status=1
remove $CG/nsprov-vm-session.scope

left=$(find $CG -mindepth 1 -type d -name 'nsprov-*' -o -mindepth 1 -type d -name 'delegate-*')
[ -z "$left" ] || { echo "vm: cgroups left behind: $left" >&2; status=1; }
exit $status
